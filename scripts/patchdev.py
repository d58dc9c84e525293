#!/usr/bin/env python3
"""Edit lacq's llama.cpp patch series in a git worktree of the pinned source.

    python scripts/patchdev.py init DIR     # pinned tree -> DIR, git init, one commit per patch
    (edit in DIR; one commit per patch; the commit message is the patch header)
    python scripts/patchdev.py export DIR   # regenerate patches/*.patch and patches/series

Patches are always regenerated from commits, never edited by hand.
"""

from __future__ import annotations

import argparse
import re
import shutil
import subprocess
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from lacq import paths  # noqa: E402
from lacq.llama.patches import read_series  # noqa: E402
from lacq.llama.source import resolve_source  # noqa: E402

PRISTINE = "pristine pinned llama.cpp"


def git(tree: Path, *args: str, **kw) -> subprocess.CompletedProcess:
    return subprocess.run(["git", "-C", str(tree), *args], check=True, text=True, **kw)


def init(dest: Path, source: str | None) -> None:
    if dest.exists():
        sys.exit(f"{dest} exists; remove it first")
    src = resolve_source(source)
    shutil.copytree(src.path, dest, symlinks=True)
    git(dest, "init", "-q")
    git(dest, "add", "-A")
    git(dest, "commit", "-q", "-m", PRISTINE)
    for patch in read_series(paths.patches_dir()):
        git(dest, "apply", "--whitespace=nowarn", str(patch.path))
        git(dest, "add", "-A")
        git(dest, "commit", "-q", "-m", patch.header)
    print(f"{dest}: pristine + {len(read_series(paths.patches_dir()))} patch commits")


def export(tree: Path) -> None:
    log = git(tree, "log", "--reverse", "--format=%H %s", capture_output=True).stdout.splitlines()
    commits = [line.split(" ", 1)[0] for line in log]
    subjects = [line.split(" ", 1)[1] for line in log]
    if subjects[0] != PRISTINE:
        sys.exit(f"first commit of {tree} is not {PRISTINE!r}")
    out = paths.patches_dir()
    for old in out.glob("*.patch"):
        old.unlink()
    names = []
    for i, commit in enumerate(commits[1:], start=1):
        header = git(tree, "log", "-1", "--format=%B", commit, capture_output=True).stdout.strip()
        slug = re.sub(r"[^a-z0-9]+", "-", header.splitlines()[0].lower()).strip("-")[:48]
        name = f"{i:04d}-{slug}.patch"
        diff = git(tree, "diff", "--no-color", "--no-ext-diff", f"{commit}^", commit, capture_output=True).stdout
        (out / name).write_text(header + "\n\n" + diff)
        names.append(name)
    (out / "series").write_text("# applied in order by lacq build; regenerate with scripts/patchdev.py export\n"
                                + "\n".join(names) + "\n")
    print("\n".join(names))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = ap.add_subparsers(dest="cmd", required=True)
    p = sub.add_parser("init")
    p.add_argument("dir", type=Path)
    p.add_argument("--source", default=None)
    p = sub.add_parser("export")
    p.add_argument("dir", type=Path)
    args = ap.parse_args()
    if args.cmd == "init":
        init(args.dir, args.source)
    else:
        export(args.dir)


if __name__ == "__main__":
    main()
