"""Parts of the default corpus that never overlap: calibration, scan and judge texts, and overlap checks.

The default corpus is WikiText-2 raw's test split (`paths.default_corpus()`), used byte for byte (CRLF line
ends included). Text that tunes a quantization must not be the text that judges it, so the corpus is cut by
bytes, at line boundaries (each cut is just past the first newline at or after its target byte, so every line
stays whole, CR and LF with it):

- calibration: the second half, from the first newline at or after the middle byte (`first_half_end`) to the
  end: `calibration_text()`, the default text of `lacq imatrix`;
- scan: the first quarter, from byte 0 to the first newline at or after half of `first_half_end`:
  `scan_text()`, what `lacq scan` measures on;
- judge: the second quarter, the rest of the first half: `judge_text()`, what `optimize --verify/--refine`
  and the demo judge on.

On wiki.test.raw (1,290,547 bytes) the cuts fall at bytes 323,033 and 645,741 (docs/text-splits.md gives
the token counts). The three parts joined in that order are the corpus, byte for byte.

Each part is written once into lacq's home (`corpus/`), atomically, under a name carrying the source
corpus's sha256, so an edited corpus gets a new part and never a stale one.

`judge_overlap` says whether a text (the scan's, known by its sha256; or a calibration file) shares lines
with a judge text, so that a judgement on seen text is flagged; `calibration_overlap` whether an importance
matrix's text shares lines with the judge or scan part; `check_length` refuses a text too short for
the chunks asked before any tool runs.
"""

from __future__ import annotations

from pathlib import Path

from lacq import paths
from lacq.cache import Cache
from lacq.errors import LacqError
from lacq.fsutil import atomic_output

SPLITS = ("scan", "judge", "calibration")  # in corpus order: scan, judge (the first half), calibration
# Lines shorter than this are left out of the overlap check: WikiText's section headings ("= = Background
# = =") repeat across articles, while no line of 48 bytes or more is shared by two parts of wiki.test.raw.
OVERLAP_MIN_LINE = 48


def _cut(data: bytes, at: int, end: int) -> int:
    """Just past the first newline in data[at:end] (`end` when there is none)."""
    nl = data.find(b"\n", at, end)
    return end if nl < 0 else nl + 1


def first_half_end(data: bytes) -> int:
    """The byte offset where the second half starts: just past the first newline at or after the middle
    (the whole text when there is no newline there)."""
    return _cut(data, len(data) // 2, len(data))


def split_bounds(data: bytes) -> dict[str, tuple[int, int]]:
    """Each part's byte range [start, end) in `data`: scan, judge and calibration, in corpus order,
    adjacent and together covering every byte."""
    half = first_half_end(data)
    quarter = _cut(data, half // 2, half)
    return {"scan": (0, quarter), "judge": (quarter, half), "calibration": (half, len(data))}


def _part_path(corpus: Path, part: str) -> Path:
    digest = Cache.open().sha256(corpus)
    return paths.sub("corpus") / f"{corpus.stem}.{digest[:16]}.{part}{corpus.suffix}"


def split_text(part: str, corpus: Path | None = None) -> Path:
    """Part `part` (scan, judge or calibration) of `corpus` (the default corpus when None), as a file in
    lacq's home, written once per corpus content."""
    if part not in SPLITS:
        raise LacqError(f"no text split {part!r}; the splits are {', '.join(SPLITS)}")
    corpus = Path(corpus) if corpus else paths.default_corpus()
    if not corpus.is_file():
        raise LacqError(f"corpus {corpus} does not exist")
    out = _part_path(corpus, part)
    if not out.exists():
        data = corpus.read_bytes()  # bytes: the cut must not depend on decoding
        start, end = split_bounds(data)[part]
        with atomic_output(out) as tmp:
            tmp.write_bytes(data[start:end])
    return out


def calibration_text(corpus: Path | None = None) -> Path:
    """The calibration part (second half) of `corpus` (the default corpus when None)."""
    return split_text("calibration", corpus)


def scan_text(corpus: Path | None = None) -> Path:
    """The scan part (first quarter) of `corpus` (the default corpus when None)."""
    return split_text("scan", corpus)


def judge_text(corpus: Path | None = None) -> Path:
    """The judge part (second quarter) of `corpus` (the default corpus when None)."""
    return split_text("judge", corpus)


def text_for(split: str | None, corpus: Path | None = None) -> Path:
    """The text a command reads: `corpus` (default: the default corpus) whole, or its part `split`."""
    if split:
        return split_text(split, corpus)
    return Path(corpus) if corpus else paths.default_corpus()


# ---------------------------------------------------------------- overlap
def _long_lines(data: bytes) -> set[bytes]:
    return {s for line in data.split(b"\n") if len(s := line.strip()) >= OVERLAP_MIN_LINE}


def shared_lines(text: bytes, judge: bytes) -> int:
    """How many distinct lines of `judge` (of OVERLAP_MIN_LINE bytes or more) also occur in `text`."""
    return len(_long_lines(judge) & _long_lines(text))


def known_text(sha256: str, corpus: Path | None = None) -> Path | None:
    """The file with these bytes among the default corpus (or `corpus`) and its parts; None if none is."""
    corpus = Path(corpus) if corpus else paths.default_corpus()
    if not corpus.is_file():
        return None
    cache = Cache.open()
    for path in (corpus, *(split_text(p, corpus) for p in SPLITS)):
        if cache.sha256(path) == sha256:
            return path
    return None


def _name(path: Path) -> str:
    for part in SPLITS:
        if path.name.endswith(f".{part}{path.suffix}"):
            return f"the {part} part of the corpus"
    return str(path)


def judge_overlap(judge: Path, *, text: Path | None = None, sha256: str | None = None, what: str = "scan",
                  corpus: Path | None = None) -> str | None:
    """Why judging on `judge` may reuse the tokens of another text (`text`, or the text with `sha256`, as
    a scan artifact records it), as one sentence; None when they share no line.

    A text known only by its hash is looked up among the corpus and its parts; one not found cannot be
    shown disjoint, and that is said too. `what` names the other text ("scan", "calibration")."""
    if text is None:
        if not sha256:
            return f"the {what} records no text hash, so it cannot be shown to share no tokens with the judge text"
        if Cache.open().sha256(judge) == sha256:
            return f"the judge text is the {what}'s own text ({_name(judge)})"
        text = known_text(sha256, corpus)
        if text is None:
            return (f"the {what}'s text (sha256 {sha256[:12]}) is neither the corpus nor one of its parts, so it "
                    "cannot be shown to share no tokens with the judge text")
    n = shared_lines(Path(text).read_bytes(), Path(judge).read_bytes())
    if n == 0:
        return None
    return (f"the judge text ({_name(Path(judge))}) shares {n} line(s) with the {what}'s text ({_name(Path(text))}): "
            f"it judges on tokens the {what} has seen")


def calibration_overlap(text: Path, corpus: Path | None = None) -> str | None:
    """Which parts of the corpus that measure a quantization (judge, scan) share lines with the calibration
    `text`, as one sentence; None when neither does (or there is no corpus to compare with).

    An importance matrix made from text the scan or the judge reads tunes the files on the tokens that
    measure them."""
    corpus = Path(corpus) if corpus else paths.default_corpus()
    if not corpus.is_file():
        return None
    data = Path(text).read_bytes()
    found = [f"{n:,} line(s) with the {part} part" for part in ("judge", "scan")
             if (n := shared_lines(data, split_text(part, corpus).read_bytes()))]
    if not found:
        return None
    return (f"the calibration text ({_name(Path(text))}) shares {' and '.join(found)} of the corpus: "
            "an importance matrix from it is tuned on tokens that measure the quantization")


# ---------------------------------------------------------------- length
def check_length(text: Path, chunks: int | None, ctx: int) -> None:
    """Refuse a text that cannot give `chunks` chunks of `ctx` tokens, before any tool runs.

    llama-perplexity needs chunks × ctx tokens (and at least 2 × ctx) and silently runs fewer chunks
    on a shorter text. A token here covers at least one byte, and the tokenizer adds at most two (BOS,
    a leading space), so a text of fewer than needed − 2 bytes is surely too short; a text that passes
    may still be, and the measurement then refuses the tool's short answer."""
    need = max(chunks or 0, 2) * ctx
    size = Path(text).stat().st_size
    if size + 2 < need:
        raise LacqError(f"{_name(Path(text))} is {size:,} bytes, too short for {chunks or 2} chunk(s) of {ctx} "
                        f"tokens ({need:,} tokens); use fewer --chunks, a shorter --ctx or a longer text")
