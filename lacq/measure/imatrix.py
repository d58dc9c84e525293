"""Importance matrices (llama-imatrix), made once per (model, text, chunks, context, build) and cached.

The file is written to a temporary name and renamed, so an interrupted or refused run leaves nothing; the
artifact cache records what made it, and quantizing with it records its sha256 (lacq/quantize.py).
"""

from __future__ import annotations

import os
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from lacq import paths
from lacq.errors import ImatrixError, OutputExistsError
from lacq.fsutil import atomic_output, canonical_hash
from lacq.llama.build import Build
from lacq.llama.tools import imatrix as tool
from lacq.measure.common import Progress
from lacq.model.imatrix import read_imatrix
from lacq.results.store import Store

DEFAULT_CHUNKS = 100  # the importance matrices in DESIGN.md: 100 x 512 tokens of the calibration text
IMATRIX_VERSION = 1  # bump when what lacq asks llama-imatrix for changes


@dataclass(frozen=True)
class ImatrixOutcome:
    path: Path
    sha256: str
    chunks: int
    ppl: float | None  # llama-imatrix's running PPL estimate over its chunks; None when cached
    skipped: bool  # made before from the same model, text, chunks and build
    seconds: float


def imatrix_key(store: Store, build: Build, model: Path, text: Path, chunks: int, ctx: int) -> str:
    return canonical_hash({"imatrix": IMATRIX_VERSION, "model": store.sha256(model), "text": store.sha256(text),
                           "chunks": chunks, "ctx": ctx, "build": build.key})


def default_output(model: Path, key: str) -> Path:
    return paths.sub("imatrix") / f"{model.stem}.{key[:16]}.imatrix.gguf"


def make_imatrix(build: Build, store: Store, model: Path, text: Path, *, chunks: int = DEFAULT_CHUNKS,
                 ctx: int = 512, output: Path | None = None, force: bool = False, threads: int | None = None,
                 ngl: int | None = None, progress: Progress | None = None) -> ImatrixOutcome:
    """The importance matrix of `model` over `chunks` x `ctx` tokens of `text` (cached, atomic).

    A text with fewer than `chunks` chunks is refused (llama-imatrix itself would quietly compute fewer)."""
    t0 = time.monotonic()
    if chunks < 1:
        raise ImatrixError(f"--chunks {chunks}: at least one chunk")
    key = imatrix_key(store, build, model, text, chunks, ctx)
    output = Path(output) if output else default_output(model, key)
    cached = store.cache.artifact(key)
    if cached is not None:  # made before, here or at another path: the same bytes
        if not output.exists():
            with atomic_output(output) as part:
                shutil.copyfile(cached, part)
            store.cache.record_artifact(key, output, store.cache.artifact_info(cached, store.sha256(cached)))
        if store.sha256(output) == store.sha256(cached):
            return ImatrixOutcome(output, store.sha256(output), chunks, None, True, time.monotonic() - t0)
    if output.exists():
        if not force:
            raise OutputExistsError(f"{output} exists and was not made from this model, text, chunks and build; "
                                    "pass --force to overwrite it or -o to choose another path")

    def on_line(line: str) -> None:
        found = tool.parse(line)
        if found.chunks is not None and found.chunks < chunks:  # stop it before it computes what was not asked
            raise ImatrixError(f"{text.name} is too short for --chunks {chunks}: it holds {found.chunks} chunk(s) "
                               f"of {ctx} tokens")
        if progress and found.seconds_per_pass:
            progress(0.1, f"{found.seconds_per_pass:.1f} s per pass")

    with tempfile.TemporaryDirectory() as tmp, atomic_output(output) as part:
        if progress:
            progress(0.02, "loading the model")
        args = tool.argv(build.tool("llama-imatrix"), model, text, part, chunks=chunks, ctx=ctx,
                         threads=threads or os.cpu_count(), ngl=ngl)
        _, log = tool.run(args, log_path=Path(tmp) / "imatrix.log", on_line=on_line)
        if log.chunks != chunks:
            raise ImatrixError(f"llama-imatrix computed over {log.chunks} chunks, not the {chunks} asked")
        read_imatrix(part)  # what it wrote is an importance matrix, before it takes the final name
    store.cache.record_artifact(key, output, {"kind": "imatrix", "model": str(model),
                                              "model_sha256": store.sha256(model), "text": str(text),
                                              "text_sha256": store.sha256(text), "chunks": chunks, "ctx": ctx,
                                              "build": build.key, "ppl": log.ppl})
    return ImatrixOutcome(output, store.sha256(output), chunks, log.ppl, False, time.monotonic() - t0)
