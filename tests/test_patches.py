"""The patch-series mechanism, on a tiny tree and on the real series file."""

import pytest

from lacq import paths
from lacq.errors import PatchError
from lacq.llama.patches import apply_series, read_series, series_hash

GOOD = """demo: change a line

What: edits one line. Why: to test.

diff --git a/src/a.txt b/src/a.txt
--- a/src/a.txt
+++ b/src/a.txt
@@ -1,3 +1,3 @@
 one
-two
+TWO
 three
"""

BAD = GOOD.replace(" one\n-two", " uno\n-two").replace("demo: change a line", "demo: stale patch")


def _tree(tmp_path):
    (tmp_path / "tree" / "src").mkdir(parents=True)
    (tmp_path / "tree" / "src" / "a.txt").write_text("one\ntwo\nthree\n")
    return tmp_path / "tree"


def _series(tmp_path, *texts):
    d = tmp_path / "patches"
    d.mkdir()
    names = []
    for i, text in enumerate(texts, 1):
        name = f"{i:04d}-p.patch"
        (d / name).write_text(text)
        names.append(name)
    (d / "series").write_text("# comment\n\n" + "\n".join(names) + "\n")
    return d


def test_applies_in_order_and_reads_header(tmp_path):
    tree = _tree(tmp_path)
    patches = read_series(_series(tmp_path, GOOD))
    assert patches[0].header.startswith("demo: change a line")
    apply_series(tree, patches)
    assert (tree / "src" / "a.txt").read_text() == "one\nTWO\nthree\n"


def test_rejected_hunk_names_patch_file_and_hunk(tmp_path):
    tree = _tree(tmp_path)
    patches = read_series(_series(tmp_path, BAD))
    with pytest.raises(PatchError) as exc:
        apply_series(tree, patches)
    msg = str(exc.value)
    assert "0001-p.patch" in msg and "src/a.txt" in msg and "hunk #1" in msg
    assert "-two" in msg  # the rejected hunk itself is shown
    assert (tree / "src" / "a.txt").read_text() == "one\ntwo\nthree\n"  # dry run first: untouched


def test_series_naming_a_missing_file(tmp_path):
    d = tmp_path / "patches"
    d.mkdir()
    (d / "series").write_text("0001-missing.patch\n")
    with pytest.raises(PatchError, match="0001-missing.patch"):
        read_series(d)


def test_series_hash_changes_with_content(tmp_path):
    a = read_series(_series(tmp_path, GOOD))
    h1 = series_hash(a)
    a[0].path.write_text(GOOD + "\n")
    assert series_hash(a) != h1


def test_shipped_series_has_headers():
    patches = read_series(paths.patches_dir())
    assert patches, "patches/series is empty"
    for p in patches:
        assert "What:" in p.header and "Why:" in p.header, p.name


def test_git_apply_fallback_without_gnu_patch(tmp_path, monkeypatch):
    import shutil as _shutil
    real = _shutil.which
    monkeypatch.setattr("lacq.llama.patches.shutil.which", lambda name: None if name == "patch" else real(name))
    tree = _tree(tmp_path)
    apply_series(tree, read_series(_series(tmp_path, GOOD)))
    assert (tree / "src" / "a.txt").read_text() == "one\nTWO\nthree\n"
    other = tmp_path / "other"
    other.mkdir()
    tree2 = _tree(other)
    with pytest.raises(PatchError, match="0001-p.patch"):
        apply_series(tree2, read_series(_series(other, BAD)))
