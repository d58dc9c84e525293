"""Run the numpy forward pass over WikiText-2 chunks, report llama-perplexity-style PPL, and save
the Hadamard-rotated K and V cache rows of every layer.

    OPENBLAS_NUM_THREADS=1 python3 bench/kvformats/dump_rows.py MODEL.gguf --chunks 4 --out rows.npz

Chunks follow llama-perplexity: consecutive n_ctx-token windows of the tokenized file, BOS
replacing the first token of each chunk when the vocabulary adds BOS; the second half of each
chunk is scored.
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import gguf
import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from model import Weights, forward, nll_second_half, read_hparams, rotate, rotation_sizes  # noqa: E402
from tokenizer import load_tokenizer  # noqa: E402

CORPUS = Path(__file__).resolve().parents[2] / "data" / "wikitext-2-raw" / "wiki.test.raw"


def corpus_tokens(tok, n_tokens: int) -> np.ndarray:
    # byte-exact file content (CRLF kept); tokenizing a prefix gives the prefix of the whole
    # file's tokens up to the cut, so take enough text and drop the tail
    text = CORPUS.read_bytes().decode("utf-8")
    n_chars = n_tokens * 6
    while True:
        ids = tok.encode(text[:n_chars])
        if len(ids) > n_tokens + 64:
            return np.array(ids[:n_tokens], dtype=np.int64)
        n_chars *= 2


def main(argv=None):
    ap = argparse.ArgumentParser()
    ap.add_argument("model")
    ap.add_argument("--chunks", type=int, default=4)
    ap.add_argument("--ctx", type=int, default=512)
    ap.add_argument("--out", required=True)
    a = ap.parse_args(argv)
    reader = gguf.GGUFReader(a.model)
    hp = read_hparams(reader)
    tok = load_tokenizer(reader)
    t0 = time.time()
    ids = corpus_tokens(tok, a.chunks * a.ctx)
    t_tok = time.time() - t0
    w = Weights(reader)
    krot, vrot = rotation_sizes(hp.head_dim)
    K = [[] for _ in range(hp.n_layer)]
    V = [[] for _ in range(hp.n_layer)]
    nll = []
    cum = []
    for c in range(a.chunks):
        chunk = ids[c * a.ctx:(c + 1) * a.ctx].copy()
        if tok.add_bos:
            chunk[0] = tok.bos
        x, out_w, ks, vs = forward(hp, w, chunk)
        nll.append(nll_second_half(x, out_w, chunk))
        cum.append(float(np.exp(np.concatenate(nll).mean())))
        for il in range(hp.n_layer):
            K[il].append(rotate(ks[il], krot).reshape(-1, hp.head_dim))
            V[il].append(rotate(vs[il], vrot).reshape(-1, hp.head_dim))
        print(f"[{c + 1}]{cum[-1]:.4f}", flush=True)
    arrays = {}
    for il in range(hp.n_layer):
        arrays[f"k{il}"] = np.concatenate(K[il]).astype(np.float32)
        arrays[f"v{il}"] = np.concatenate(V[il]).astype(np.float32)
    meta = dict(model=Path(a.model).name, arch=hp.arch, n_layer=hp.n_layer, head_dim=hp.head_dim,
                n_head_kv=hp.n_head_kv, k_rot=krot, v_rot=vrot, chunks=a.chunks, ctx=a.ctx,
                ppl_per_chunk_cumulative=cum, first_tokens=ids[:16].tolist(),
                tokenize_s=round(t_tok, 1), wall_s=round(time.time() - t0, 1),
                swa_layers=[il for il in range(hp.n_layer) if hp.swa_pattern and il % hp.swa_pattern < hp.swa_pattern - 1])
    np.savez(a.out, meta=json.dumps(meta), **arrays)
    print(json.dumps(meta))


if __name__ == "__main__":
    main()
