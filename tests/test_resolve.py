"""Finding a model: hf:// without a network fails after one attempt with one line, and
HF_HUB_OFFLINE uses lacq's Hub cache only. No real network: the Hub endpoint is a closed
local port."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import pytest
from synth import write_synthetic_gguf

REPO = Path(__file__).resolve().parent.parent
UNREACHABLE = "http://127.0.0.1:9"  # the discard port: nothing listens, the connection is refused


def _lacq(home: Path, *args, **env) -> tuple[subprocess.CompletedProcess, float]:
    """`lacq ARGS` in a fresh process: huggingface-hub reads HF_ENDPOINT when it is imported."""
    full = {k: v for k, v in os.environ.items() if not k.startswith("HF_")}
    full.update(LACQ_HOME=str(home), PYTHONPATH=str(REPO), **env)
    t0 = time.monotonic()
    done = subprocess.run([sys.executable, "-m", "lacq", *map(str, args)], capture_output=True, text=True, env=full,
                          timeout=120)
    return done, time.monotonic() - t0


def _cache(home: Path) -> Path:
    """A synthetic model in lacq's Hub cache as huggingface-hub lays it out, as hf://owner/repo/m.gguf."""
    repo = home / "hf" / "models--owner--repo"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text("0" * 40)
    snapshot = repo / "snapshots" / ("0" * 40)
    snapshot.mkdir(parents=True)
    return write_synthetic_gguf(snapshot / "m.gguf", n_blocks=4)


SHOW = ("recipes", "show", "first4_q8", "--model", "hf://owner/repo/m.gguf")


def test_hf_without_network_fails_after_one_attempt_with_one_line(tmp_path):
    done, seconds = _lacq(tmp_path, *SHOW, HF_ENDPOINT=UNREACHABLE)
    assert done.returncode == 1, done.stderr
    assert seconds < 10, f"took {seconds:.0f} s"
    assert done.stderr.startswith("Error: could not fetch hf://owner/repo/m.gguf: the Hugging Face Hub cannot be "
                                  "reached"), done.stderr
    assert "not in lacq's cache" in done.stderr
    assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert "Retrying" not in done.stderr and "Traceback" not in done.stderr


def test_hf_without_network_uses_the_cached_file(tmp_path):
    _cache(tmp_path)
    done, seconds = _lacq(tmp_path, *SHOW, HF_ENDPOINT=UNREACHABLE)
    assert done.returncode == 0, done.stderr
    assert seconds < 10
    assert "^blk\\.0\\.attn_q\\.weight$=q8_0" in done.stdout
    assert "cannot be reached; using the cached" in done.stderr


@pytest.mark.parametrize("cached", [False, True], ids=["not-cached", "cached"])
def test_hf_hub_offline_uses_the_cache_only(tmp_path, cached):
    if cached:
        _cache(tmp_path)
    # An endpoint that would answer slowly if it were asked: offline must not ask at all.
    done, seconds = _lacq(tmp_path, *SHOW, HF_HUB_OFFLINE="1", HF_ENDPOINT="http://10.255.255.1:81")
    assert seconds < 10
    if cached:
        assert done.returncode == 0, done.stderr
        assert "^blk\\.0\\.attn_q\\.weight$=q8_0" in done.stdout
    else:
        assert done.returncode == 1
        assert done.stderr.strip() == (f"Error: could not fetch hf://owner/repo/m.gguf: HF_HUB_OFFLINE is set, and it "
                                       f"is not in lacq's cache ({tmp_path / 'hf'})")
