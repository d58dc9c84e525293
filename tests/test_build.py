"""The build key: what makes lacq rebuild llama.cpp, and what must not."""

from __future__ import annotations

from lacq import paths
from lacq.llama import build as build_mod
from lacq.llama.patches import read_series


def test_compilers_enter_the_build_key_only_when_set(monkeypatch):
    spec = build_mod.BuildSpec()
    patches = read_series(paths.patches_dir())
    for var in build_mod.COMPILER_ENV:
        monkeypatch.delenv(var, raising=False)
    plain = build_mod._build_key("src", patches, spec)
    monkeypatch.setenv("CXX", "/usr/bin/g++")
    with_cxx = build_mod._build_key("src", patches, spec)
    monkeypatch.setenv("CXX", "/opt/gcc/bin/g++")
    other_cxx = build_mod._build_key("src", patches, spec)
    monkeypatch.setenv("CXX", "")
    assert len({plain, with_cxx, other_cxx}) == 3
    assert build_mod._build_key("src", patches, spec) == plain  # empty means unset


def test_build_key_follows_source_patches_backend_and_flags(monkeypatch):
    for var in build_mod.COMPILER_ENV:
        monkeypatch.delenv(var, raising=False)
    patches = read_series(paths.patches_dir())
    key = lambda src="src", p=patches, **kw: build_mod._build_key(src, p, build_mod.BuildSpec(**kw))
    base = key()
    assert key() == base  # stable
    assert len({base, key(src="other"), key(p=patches[:-1]), key(backend="cuda"), key(backend="cuda", cuda_arch="90"),
                key(extra_targets=("test-backend-ops",)), key(p=[])}) == 7
