"""A scan's bookkeeping: what its assembled variants are filed as, and what each KV layer costs."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from types import SimpleNamespace

from lacq import cache, paths
from lacq.model.info import inspect_model
from lacq.results.store import Store
from lacq.studies import scan


def test_assembled_variants_are_filed_by_recipe_not_hashed_nor_kept_in_the_cache(tmp_path, monkeypatch):
    from synth import write_synthetic_gguf
    work = tmp_path / "work"
    work.mkdir()
    files = {t: write_synthetic_gguf(work / f"all-{t}.gguf", n_blocks=2, tensor_type=t) for t in ("f16", "f32")}
    cinfo = {t: inspect_model(p) for t, p in files.items()}
    read, real_sha256 = [], cache.file_sha256
    monkeypatch.setattr(cache, "file_sha256", lambda p: read.append(Path(p).name) or real_sha256(p))
    measured = []

    def fake_kld(build, store, path, info, *a, label, **kw):  # files the result as measure_kld's record() does
        assert path.exists() and info.tensor("blk.0.attn_q.weight")
        measured.append(path)
        return SimpleNamespace(result_id=store.add(kind="kld", label=label, model=path, build={}, command=[],
                                                   metrics={}))

    monkeypatch.setattr(scan, "measure_kld", fake_kld)
    store = Store(tmp_path / "r.sqlite")
    one, two = {"blk.0.attn_q.weight": "f32"}, {"blk.1.ffn_up.weight": "f32", "blk.1.ffn_down.weight": "f32"}
    ids = [scan.measure_assembled(None, store, files, cinfo, "f16", tensors, None, None, tmp_path / "corpus", work,
                                  ctx=512, chunks=1, threads=None, label=f"v{i}", study="s")
           for i, tensors in enumerate((one, two, one))]
    variants = [p for p in measured if p.name == "variant.gguf"]
    assert len(variants) == 3 and not any(p.exists() for p in variants)
    db = sqlite3.connect(paths.home() / "cache.sqlite")
    kept = [r[0] for r in db.execute("SELECT path FROM file_hashes")]
    assert sorted(kept) == sorted(str(p.resolve()) for p in files.values())  # the candidates only
    assert "variant.gguf" not in read  # no variant was read to hash it
    from lacq.model.assemble import assembly_hash
    shas = [store.get(i).model_sha256 for i in ids]
    f16, f32 = store.sha256(files["f16"]), store.sha256(files["f32"])
    assert shas[0] == shas[2] == assembly_hash(f16, {"f32": f32}, one) != shas[1]
    assert len(shas[0]) == 64 and shas[0] not in (f16, f32)
