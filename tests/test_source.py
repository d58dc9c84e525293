import subprocess

import pytest

from lacq.errors import SourceError
from lacq.llama.source import resolve_source, source_hash_if_present


def _fake_tree(path):
    (path / "src").mkdir(parents=True)
    (path / "CMakeLists.txt").write_text("project(x)\n")
    (path / "src" / "llama.cpp").write_text("// llama\n")
    return path


def test_local_tree_hash_follows_content(tmp_path):
    tree = _fake_tree(tmp_path / "t")
    a = resolve_source(str(tree))
    assert a.origin.startswith("path:") and source_hash_if_present(str(tree)) == a.hash
    (tree / "src" / "llama.cpp").write_text("// changed\n")
    b = resolve_source(str(tree))
    assert b.hash != a.hash
    (tree / "src" / "llama.cpp").write_text("// chunged\n")  # same size: the cached digest must not stand
    assert resolve_source(str(tree)).hash not in (a.hash, b.hash)
    (tree / "src" / ".git").mkdir()
    (tree / "src" / ".git" / "HEAD").write_text("ref: x\n")
    (tree / "docs").mkdir()
    (tree / "docs" / "x.md").write_text("doc\n")
    assert resolve_source(str(tree)).hash == source_hash_if_present(str(tree))  # .git and docs are not hashed
    (tree / "src" / "llama.cpp").write_text("// changed\n")
    assert resolve_source(str(tree)).hash == b.hash


def test_not_a_llama_tree(tmp_path):
    with pytest.raises(SourceError, match="not a llama.cpp source tree"):
        resolve_source(str(tmp_path))


def test_git_source_clones_once(tmp_path):
    repo = _fake_tree(tmp_path / "repo")
    for cmd in (["init", "-q"], ["add", "-A"], ["-c", "user.email=t@t", "-c", "user.name=t", "commit", "-qm", "x"]):
        subprocess.run(["git", "-C", str(repo), *cmd], check=True)
    spec = f"git+file://{repo}@HEAD"
    assert source_hash_if_present(spec) is None  # nothing cloned yet, so nothing can be built
    src = resolve_source(spec)
    assert (src.path / "src" / "llama.cpp").exists() and src.origin == f"git:file://{repo}@HEAD"
    assert source_hash_if_present(spec) == src.hash
    with pytest.raises(SourceError, match="git clone"):
        resolve_source(f"git+file://{tmp_path}/nope@main")
