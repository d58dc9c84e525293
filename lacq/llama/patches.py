"""The patch series lacq applies to llama.cpp.

`patches/series` names patch files in order (blank lines and `#` comments
allowed). Each patch file starts with a free-text header saying what it
changes and why; the diff follows (`patch` skips the header).
"""

from __future__ import annotations

import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path

from lacq.errors import PatchError
from lacq.fsutil import canonical_hash, file_sha256


@dataclass(frozen=True)
class Patch:
    name: str
    path: Path

    @property
    def header(self) -> str:
        lines = []
        for line in self.path.read_text().splitlines():
            if line.startswith("diff --git") or line.startswith("--- "):
                break
            lines.append(line)
        return "\n".join(lines).strip()


def read_series(patch_dir: Path) -> list[Patch]:
    series = patch_dir / "series"
    if not series.exists():
        return []
    patches = []
    for raw in series.read_text().splitlines():
        name = raw.split("#", 1)[0].strip()
        if not name:
            continue
        path = patch_dir / name
        if not path.is_file():
            raise PatchError(f"patches/series names {name}, but {path} does not exist")
        patches.append(Patch(name, path))
    return patches


def series_hash(patches: list[Patch]) -> str:
    return canonical_hash([[p.name, file_sha256(p.path)] for p in patches])


def _hunk_text(patch_path: Path, target_file: str, hunk_no: int) -> str:
    """The text of hunk `hunk_no` (1-based) for `target_file` in a unified diff."""
    lines = patch_path.read_text().splitlines()
    in_file, count, out = False, 0, []
    for line in lines:
        if line.startswith("+++ "):
            name = line[4:].split("\t")[0]
            in_file = name.endswith("/" + target_file) or name == target_file
            continue
        if line.startswith("diff --git"):
            in_file = False
            if out:
                break
        if not in_file:
            continue
        if line.startswith("@@"):
            count += 1
            if out:
                break
        if count == hunk_no:
            out.append(line)
    return "\n".join(out[:40])


def _git_apply(tree: Path, patch: Patch) -> None:
    """Fallback where GNU patch is not installed: git apply, strict context."""
    check = subprocess.run(["git", "apply", "--check", "-v", str(patch.path)], cwd=tree, capture_output=True, text=True)
    if check.returncode != 0:
        errors = [l for l in check.stderr.splitlines() if l.startswith("error:")]
        raise PatchError(f"patch {patch.name} does not apply:\n" + "\n".join(errors[:6] or [check.stderr.strip()[-800:]]))
    subprocess.run(["git", "apply", str(patch.path)], cwd=tree, check=True, capture_output=True)


def apply_patch(tree: Path, patch: Patch) -> None:
    """Apply one patch; on failure raise PatchError naming the patch and the rejected hunk."""
    if shutil.which("patch") is None:
        if shutil.which("git") is None:
            raise PatchError("applying patches needs GNU patch or git; install one (apt-get install patch)")
        return _git_apply(tree, patch)
    base = ["patch", "-p1", "--forward", "--batch", "--fuzz=0", "--no-backup-if-mismatch", "-i", str(patch.path), "-d", str(tree)]
    check = subprocess.run(base + ["--dry-run"], capture_output=True, text=True)
    if check.returncode != 0:
        out = check.stdout + check.stderr
        current = None
        for line in out.splitlines():
            m = re.match(r"(?:checking|patching) file (\S+)", line)
            if m:
                current = m.group(1)
            m = re.match(r"Hunk #(\d+) FAILED at (\d+)", line)
            if m and current:
                hunk = _hunk_text(patch.path, current, int(m.group(1)))
                raise PatchError(
                    f"patch {patch.name} does not apply: {current}, hunk #{m.group(1)} "
                    f"(expected near line {m.group(2)}) was rejected:\n{hunk}"
                )
        raise PatchError(f"patch {patch.name} does not apply:\n{out.strip()[-1500:]}")
    done = subprocess.run(base, capture_output=True, text=True)
    if done.returncode != 0:
        raise PatchError(f"patch {patch.name} failed while applying:\n{(done.stdout + done.stderr).strip()[-1500:]}")


def apply_series(tree: Path, patches: list[Patch]) -> None:
    for patch in patches:
        apply_patch(tree, patch)
