"""Parts of the default corpus that never overlap: the calibration text importance matrices are made from.

The default corpus is WikiText-2 raw's test split (`paths.default_corpus()`). Text that tunes a quantization
(an importance matrix) must not be the text that judges it, so the corpus is cut in two halves by bytes, at a
line boundary (the first newline at or after the middle byte; the newline stays with the first half):

- calibration: the second half, `calibration_text()`, the default text of `lacq imatrix`;
- the first half is where scan and judge chunks come from (disjoint parts of it; not cut here yet).

Each part is written once into lacq's home (`corpus/`), atomically, under a name carrying the source
corpus's sha256, so an edited corpus gets a new part and never a stale one. Functions for the scan and judge
parts belong beside `calibration_text` and cut only the first half (`first_half_end` says where it ends).
"""

from __future__ import annotations

from pathlib import Path

from lacq import paths
from lacq.cache import Cache
from lacq.fsutil import atomic_output


def first_half_end(data: bytes) -> int:
    """The byte offset where the second half starts: just past the first newline at or after the middle
    (the whole text when there is no newline there)."""
    nl = data.find(b"\n", len(data) // 2)
    return len(data) if nl < 0 else nl + 1


def _part_path(corpus: Path, part: str) -> Path:
    digest = Cache.open().sha256(corpus)
    return paths.sub("corpus") / f"{corpus.stem}.{digest[:16]}.{part}{corpus.suffix}"


def calibration_text(corpus: Path | None = None) -> Path:
    """The calibration part (second half) of `corpus` (the default corpus when None), as a file in lacq's
    home, written once per corpus content."""
    corpus = Path(corpus) if corpus else paths.default_corpus()
    out = _part_path(corpus, "calibration")
    if not out.exists():
        data = corpus.read_bytes()  # bytes: the cut must not depend on decoding
        with atomic_output(out) as part:
            part.write_bytes(data[first_half_end(data):])
    return out
