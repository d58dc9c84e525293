"""Getting the llama.cpp source lacq builds, and hashing it.

The default is the llama.cpp tree vendored in PyPI's llama-cpp-python sdist,
pinned by sha256: pip can fetch it wherever PyPI is reachable, which is more
places than GitHub. Users may also give a local checkout or a git URL.
"""

from __future__ import annotations

import hashlib
import logging
import os
import subprocess
import sys
import tarfile
import tempfile
from dataclasses import dataclass
from pathlib import Path

from lacq import paths
from lacq.cache import Cache
from lacq.errors import SourceError
from lacq.fsutil import atomic_directory, canonical_hash, file_sha256

log = logging.getLogger(__name__)

PINNED_PACKAGE = "llama-cpp-python"
PINNED_VERSION = "0.3.36"
PINNED_SHA256 = "832db0699007f1be95a7e41ef12e88926b02ba836461e36a36372db2760c1a2e"
PINNED_SUBDIR = "vendor/llama.cpp"

# Directories of a llama.cpp tree that affect what lacq builds; hashing only
# these keeps the hash of a local checkout fast and stable across doc edits.
HASHED_PARTS = ("CMakeLists.txt", "cmake", "common", "ggml", "include", "src", "tools", "tests", "vendor")


@dataclass(frozen=True)
class Source:
    """A llama.cpp tree ready to be patched."""

    path: Path
    hash: str
    origin: str  # "pinned:<pkg>==<ver>", "path:<dir>" or "git:<url>@<ref>"


def _sdist_name() -> str:
    return f"{PINNED_PACKAGE.replace('-', '_')}-{PINNED_VERSION}.tar.gz"


def fetch_pinned_sdist() -> Path:
    """Download the pinned sdist once (pip), verify its sha256, return its path."""
    target = paths.sub("downloads") / _sdist_name()
    if target.exists():
        if file_sha256(target) == PINNED_SHA256:
            return target
        log.warning("cached %s has the wrong sha256; fetching again", target.name)
        target.unlink()
    with tempfile.TemporaryDirectory(dir=target.parent) as tmp:
        cmd = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", ":all:",
               f"{PINNED_PACKAGE}=={PINNED_VERSION}", "-d", tmp, "-q"]
        proc = subprocess.run(cmd, capture_output=True, text=True)
        got = Path(tmp) / _sdist_name()
        if proc.returncode != 0 or not got.exists():
            raise SourceError(
                f"could not download {PINNED_PACKAGE}=={PINNED_VERSION} from PyPI "
                f"(pip said: {(proc.stderr or proc.stdout).strip()[-400:]}). "
                "Without a network, pass --source PATH to a llama.cpp tree."
            )
        digest = file_sha256(got)
        if digest != PINNED_SHA256:
            raise SourceError(f"{got.name} has sha256 {digest}, expected {PINNED_SHA256}; refusing to build it")
        os.replace(got, target)
    return target


def pinned_source() -> Source:
    """The pinned tree, extracted once under lacq's home."""
    dest = paths.sub("sources") / f"pinned-{PINNED_SHA256[:16]}"
    tree = dest / "llama.cpp"
    if not (tree / "CMakeLists.txt").exists():
        sdist = fetch_pinned_sdist()
        with atomic_directory(dest) as tmp:
            prefix = f"{PINNED_PACKAGE.replace('-', '_')}-{PINNED_VERSION}/{PINNED_SUBDIR}/"
            with tarfile.open(sdist) as tar:
                # The sdist's vendor tree carries a `.git` file pointing at a submodule
                # store that is not there; dropping it keeps git and cmake quiet.
                members = [m for m in tar.getmembers()
                           if m.name.startswith(prefix) and m.name != prefix + ".git"]
                for m in members:
                    m.name = "llama.cpp/" + m.name[len(prefix):]
                tar.extractall(tmp, members=members, filter="data")
    return Source(path=tree, hash=PINNED_SHA256, origin=f"pinned:{PINNED_PACKAGE}=={PINNED_VERSION}")


def tree_hash(tree: Path) -> str:
    """sha256 over the build-relevant files of a llama.cpp tree (names and content hashes).

    File contents are hashed through lacq's cache, keyed by size and mtime, so
    hashing an unchanged local checkout again only stats its files.
    """
    tree = Path(tree).resolve()
    files: list[Path] = []
    for part in HASHED_PARTS:
        root = tree / part
        if root.is_file():
            files.append(root)
            continue
        found = []
        for dirpath, dirnames, filenames in os.walk(root):
            dirnames[:] = [d for d in dirnames if d != ".git"]
            found += [Path(dirpath, f) for f in filenames]
        files += sorted(f for f in found if f.is_file())
    cache = Cache.open()
    try:
        digests = cache.sha256_many(files)
    finally:
        cache.db.close()
    h = hashlib.sha256()
    for f, digest in zip(files, digests):
        h.update(f.relative_to(tree).as_posix().encode() + b"\0" + digest.encode() + b"\0")
    return h.hexdigest()


def local_source(path: Path) -> Source:
    tree = path.expanduser().resolve()
    if not (tree / "CMakeLists.txt").is_file() or not (tree / "src" / "llama.cpp").is_file():
        raise SourceError(f"{path} is not a llama.cpp source tree (no CMakeLists.txt and src/llama.cpp)")
    return Source(path=tree, hash=tree_hash(tree), origin=f"path:{tree}")


def git_source(spec: str) -> Source:
    """`git+URL@REF`: clone once into lacq's home, keyed by URL and ref."""
    url, _, ref = spec[len("git+"):].rpartition("@")
    if not url or not ref:
        raise SourceError(f"git source must look like git+URL@REF, got {spec!r}")
    dest = paths.sub("sources") / f"git-{canonical_hash([url, ref])[:16]}"
    if not (dest / "CMakeLists.txt").exists():
        with atomic_directory(dest) as tmp:
            clone = tmp / "tree"
            for cmd in (["git", "clone", "--quiet", url, str(clone)],
                        ["git", "-C", str(clone), "checkout", "--quiet", ref]):
                proc = subprocess.run(cmd, capture_output=True, text=True)
                if proc.returncode != 0:
                    raise SourceError(f"{' '.join(cmd[:3])} failed: {proc.stderr.strip()[-400:]}")
            for item in clone.iterdir():
                os.replace(item, tmp / item.name)
            clone.rmdir()
    src = local_source(dest)
    return Source(path=src.path, hash=src.hash, origin=f"git:{url}@{ref}")


def source_hash_if_present(spec: str | None) -> str | None:
    """The hash `resolve_source(spec)` would give, without downloading anything.

    None when the source is not fetched yet (so nothing can have been built from it).
    """
    if spec is None or spec == "pinned":
        return PINNED_SHA256
    if spec.startswith("git+"):
        url, _, ref = spec[len("git+"):].rpartition("@")
        dest = paths.home() / "sources" / f"git-{canonical_hash([url, ref])[:16]}"
        return tree_hash(dest) if (dest / "CMakeLists.txt").exists() else None
    return local_source(Path(spec)).hash


def resolve_source(spec: str | None) -> Source:
    """None -> the pinned tree; `git+URL@REF`; otherwise a local path."""
    if spec is None or spec == "pinned":
        return pinned_source()
    if spec.startswith("git+"):
        return git_source(spec)
    return local_source(Path(spec))
