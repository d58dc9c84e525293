"""Preparing the patched llama.cpp tree and building it per backend, cached.

Flags come from lacq/data/build_flags.json, which the top-level
CMakeLists.txt reads too. A build is keyed by (source hash, patch series
hash, backend, flags, targets, host machine, and the CC/CXX/CUDAHOSTCXX
compilers where set); building again with the same
key only checks a stamp file.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import re
import shutil
import subprocess
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable

from lacq import paths
from lacq.errors import BuildError
from lacq.fsutil import atomic_directory, canonical_hash, write_text_atomic
from lacq.llama.elf import PRIVATE_RUNTIME_HINT, private_cxx_runtime
from lacq.llama.patches import Patch, apply_series, read_series, series_hash
from lacq.llama.source import Source, resolve_source, source_hash_if_present
from lacq.llama.tools.base import _tool_preexec, stop_group

log = logging.getLogger(__name__)

FLAGS_FILE = Path(__file__).resolve().parent.parent / "data" / "build_flags.json"
BACKENDS = ("cpu", "cuda", "metal")
STAMP = "lacq-build.json"
PREPARED_STAMP = ".lacq-prepared.json"

Progress = Callable[[float, str], None]


def load_flags() -> dict:
    return json.loads(FLAGS_FILE.read_text())


@dataclass(frozen=True)
class BuildSpec:
    backend: str = "cpu"
    cuda_arch: str | None = None  # None -> "native" for cuda
    extra_targets: tuple[str, ...] = ()
    patches: bool = True  # False builds the stock tree (for comparisons)

    def cmake_defines(self) -> dict[str, str]:
        if self.backend not in BACKENDS:
            raise BuildError(f"unknown backend {self.backend!r}; choose one of {', '.join(BACKENDS)}")
        flags = load_flags()
        defines = dict(flags["common"])
        defines.update(flags["backends"][self.backend])
        if self.backend == "cuda":
            defines["CMAKE_CUDA_ARCHITECTURES"] = self.cuda_arch or "native"
        return defines

    def targets(self) -> list[str]:
        return list(dict.fromkeys(load_flags()["targets"] + list(self.extra_targets)))


@dataclass(frozen=True)
class Build:
    """A finished build: where its binaries are and what made it."""

    key: str
    bin_dir: Path
    source_hash: str
    source_origin: str
    series_hash: str
    patches: tuple[str, ...]
    backend: str
    defines: dict = field(default_factory=dict)
    targets: tuple[str, ...] = ()
    seconds: float | None = None  # how long the build took

    def tool(self, name: str) -> Path:
        path = self.bin_dir / name
        if not path.exists():
            raise BuildError(f"{name} is not in the build at {self.bin_dir}; build it with `lacq build`")
        return path

    def provenance(self) -> dict:
        return {"build_key": self.key, "source_hash": self.source_hash, "source_origin": self.source_origin,
                "series_hash": self.series_hash, "patches": list(self.patches), "backend": self.backend,
                "defines": self.defines}


def _series(spec: BuildSpec) -> list[Patch]:
    return read_series(paths.patches_dir()) if spec.patches else []


def _skip_build_dirs(root: Path):
    """copytree ignore: .git anywhere, and build directories at the top of the tree only."""

    def ignore(directory: str, names: list[str]) -> set[str]:
        skip = {n for n in names if n == ".git"}
        if Path(directory) == root:
            skip |= {n for n in names if (n == "build" or n.startswith("build-")) and (root / n).is_dir()}
        return skip

    return ignore


def prepare_tree(source: Source, patches: list[Patch]) -> Path:
    """Copy the source and apply the series once; return the prepared tree.

    The prepared tree is keyed by (source hash, series hash), so every backend
    and the plain-CMake path share it.
    """
    key = _tree_key(source.hash, patches)
    root = paths.sub("trees") / key
    tree = root / "llama.cpp"
    if (tree / PREPARED_STAMP).exists():
        return tree
    with atomic_directory(root) as tmp:
        shutil.copytree(source.path, tmp / "llama.cpp", symlinks=True, ignore=_skip_build_dirs(source.path))
        apply_series(tmp / "llama.cpp", patches)
        stamp = {"source": source.origin, "source_hash": source.hash, "patches": [p.name for p in patches],
                 "series_hash": series_hash(patches)}
        (tmp / "llama.cpp" / PREPARED_STAMP).write_text(json.dumps(stamp, indent=1))
    return tree


def prepared_source(spec: BuildSpec, source_spec: str | None = None) -> Path:
    return prepare_tree(resolve_source(source_spec), _series(spec))


# The environment variables through which CMake picks compilers at configure time. A
# build directory keeps the compilers of its first configure, so they belong in the key.
COMPILER_ENV = ("CC", "CXX", "CUDAHOSTCXX")


def _build_key(source_hash: str, patches: list[Patch], spec: BuildSpec) -> str:
    fields = {
        "source": source_hash, "series": series_hash(patches), "backend": spec.backend,
        "defines": spec.cmake_defines(), "targets": spec.targets(),
        "machine": platform.machine(),
    }
    compilers = {k: os.environ[k] for k in COMPILER_ENV if os.environ.get(k)}
    if compilers:  # only when set, so keys made without them stay valid
        fields["compilers"] = compilers
    return canonical_hash(fields)[:16]


def _build_dir(tree: Path, spec: BuildSpec, key: str) -> Path:
    # Inside the prepared tree, so every build has the same relative layout and
    # ccache (with CCACHE_BASEDIR) reuses objects across keys.
    return tree / f"build-{spec.backend}-{key}"


def _tree_key(source_hash: str, patches: list[Patch]) -> str:
    return canonical_hash({"source": source_hash, "series": series_hash(patches)})[:16]


def find_build(spec: BuildSpec, source_spec: str | None = None) -> Build | None:
    """The finished build for this spec, or None. Never downloads or builds."""
    source_hash = source_hash_if_present(source_spec)
    if source_hash is None:
        return None
    patches = _series(spec)
    key = _build_key(source_hash, patches, spec)
    tree = paths.home() / "trees" / _tree_key(source_hash, patches) / "llama.cpp"
    stamp = _build_dir(tree, spec, key) / STAMP
    if stamp.exists():
        return _load_stamp(stamp)
    # A build of the same tree, backend and flags that made extra targets (test-backend-ops) serves too.
    for other in sorted(tree.glob(f"build-{spec.backend}-*/{STAMP}")):
        found = _load_stamp(other)
        if found.defines == spec.cmake_defines() and set(spec.targets()) <= set(found.targets):
            return found
    return None


def _load_stamp(stamp: Path) -> Build:
    data = json.loads(stamp.read_text())
    data["bin_dir"] = Path(data["bin_dir"])
    data["patches"] = tuple(data["patches"])
    data["targets"] = tuple(data["targets"])
    return Build(**data)


def require_build(spec: BuildSpec, source_spec: str | None = None) -> Build:
    found = find_build(spec, source_spec)
    if found is None:
        hint = f" --backend {spec.backend}" if spec.backend != "cpu" else ""
        raise BuildError(f"no {spec.backend} build of llama.cpp for the current source and patches; "
                         f"run `lacq build{hint}` first")
    return found


_PERCENT = re.compile(r"^\[\s*(\d+)%\]")
_NINJA = re.compile(r"^\[(\d+)/(\d+)\]")


def _run_logged(cmd: list[str], log_path: Path, env: dict, progress: Progress | None, lo: float, hi: float) -> None:
    with open(log_path, "a") as logf:
        logf.write("$ " + " ".join(cmd) + "\n")
        logf.flush()
        # Its own session, stopped as a group on Ctrl-C/SIGTERM: cmake's compilers are its children.
        # Like a tool, cmake dies with lacq when lacq is killed outright (no handler runs then).
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=env,
                                start_new_session=True,
                                preexec_fn=_tool_preexec())  # noqa: PLW1509 (see tools.base._tool_preexec)
        try:
            assert proc.stdout is not None
            for line in proc.stdout:
                logf.write(line)
                if progress is None:
                    continue
                m = _NINJA.match(line)
                frac = int(m.group(1)) / int(m.group(2)) if m else None
                if frac is None and (m := _PERCENT.match(line)):
                    frac = int(m.group(1)) / 100
                if frac is not None:
                    progress(lo + (hi - lo) * frac, line.strip()[:80])
            rc = proc.wait()
        except BaseException:
            stop_group(proc)
            raise
    if rc != 0:
        tail = "\n".join(log_path.read_text().splitlines()[-25:])
        raise BuildError(f"`{' '.join(cmd[:4])} ...` failed (exit {rc}); full log: {log_path}\n{tail}")


def _generator() -> str:
    for gen in load_flags()["generator_preference"]:
        if gen == "Ninja" and shutil.which("ninja"):
            return gen
        if gen == "Unix Makefiles":
            return gen
    return "Unix Makefiles"


def build(spec: BuildSpec, source_spec: str | None = None, progress: Progress | None = None,
          jobs: int | None = None) -> Build:
    """Build (or find) the patched llama.cpp for `spec`. Idempotent and cached."""
    source = resolve_source(source_spec)
    patches = _series(spec)
    key = _build_key(source.hash, patches, spec)
    tree = prepare_tree(source, patches)
    bdir = _build_dir(tree, spec, key)
    stamp = bdir / STAMP
    if stamp.exists():
        return _load_stamp(stamp)
    bdir.mkdir(parents=True, exist_ok=True)
    log_path = bdir / "lacq-build.log"
    env = dict(os.environ, CCACHE_BASEDIR=str(paths.home()))
    defines = spec.cmake_defines()
    t0 = time.monotonic()
    configure = ["cmake", "-S", str(tree), "-B", str(bdir), "-G", _generator()]
    configure += [f"-D{k}={v}" for k, v in defines.items()]
    if progress:
        progress(0.0, "configuring")
    _run_logged(configure, log_path, env, progress, 0.0, 0.02)
    jobs = jobs or os.cpu_count() or 2
    build_cmd = ["cmake", "--build", str(bdir), "-j", str(jobs), "--target", *spec.targets()]
    _run_logged(build_cmd, log_path, env, progress, 0.02, 1.0)
    result = Build(key=key, bin_dir=bdir / "bin", source_hash=source.hash, source_origin=source.origin,
                   series_hash=series_hash(patches), patches=tuple(p.name for p in patches),
                   backend=spec.backend, defines=defines, targets=tuple(spec.targets()),
                   seconds=round(time.monotonic() - t0, 1))
    data = asdict(result)
    data["bin_dir"] = str(result.bin_dir)
    write_text_atomic(stamp, json.dumps(data, indent=1))
    if (lib := private_cxx_runtime(result.bin_dir)) is not None:
        log.warning("%s defines std::locale: the tools run, but `lacq niah --runner bindings` will refuse "
                    "this build: %s", lib.name, PRIVATE_RUNTIME_HINT)
    return result
