"""A scan's bookkeeping: what its assembled variants are filed as, and what each KV layer costs."""

from __future__ import annotations

import sqlite3
from pathlib import Path
from types import SimpleNamespace

from lacq import cache, paths
from lacq.model.info import inspect_model
from lacq.plan.kv.cells import kv_cells, layer_values
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


def _iswa_model(tmp_path, window: int, n_blocks: int = 12):
    from synth import write_synthetic_gguf
    return inspect_model(write_synthetic_gguf(tmp_path / "g.gguf", n_blocks=n_blocks, arch="gemma3", n_head=4,
                                              n_head_kv=1, n_embd=256,
                                              extra_kv={"{arch}.attention.sliding_window": window}))


def test_kv_cells_are_what_the_captured_iswa_run_allocated(tmp_path, capture):
    import re
    log = capture("kv_policy_iswa_gemma3.log")  # the gemma3 fixture (window 128) at -c 512
    window = int(re.search(r"n_swa\s+= (\d+)", log).group(1))
    ctx = int(re.search(r"calculating perplexity over \d+ chunks, n_ctx=(\d+)", log).group(1))
    full, swa = (int(n) for n in re.findall(r"creating +(?:non-SWA|SWA) KV cache, size = (\d+) cells", log))
    assert kv_cells(_iswa_model(tmp_path, window), ctx) == (full, swa)


def test_sliding_window_layers_are_priced_at_their_window(tmp_path):
    info = _iswa_model(tmp_path, 512, n_blocks=6)  # gemma3's pattern: blocks 0-4 sliding, 5 global
    assert info.swa_blocks == (0, 1, 2, 3, 4)
    # llama.cpp's SWA cache: the window + one ubatch (512), padded to 256 cells, never more than the context
    assert kv_cells(info, 4096) == (4096, 1024)
    assert kv_cells(info, 512) == (512, 512)
    per_cell = info.head_dim_v  # one KV head
    assert layer_values(info, 4096, "v") == [1024.0 * per_cell] * 5 + [4096.0 * per_cell]
    assert layer_values(info, 4096, "both") == [2 * v for v in layer_values(info, 4096, "v")]
