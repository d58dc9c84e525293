#!/usr/bin/env python3
"""Make lacq's clean base: a small llama model trained from scratch, whose weights were never quantized.

SmolLM2's F16 base is dequantized from Q4_1, so candidate types can re-create its grid and every
weight-quality number measured on it is distorted (issue 20). This script makes a base without that
history, from registry inputs only:

  data   download English documentation from Debian packages (apt-get download, no install), turn it
         into plain text, tokenize it with SmolLM2's tokenizer (read from SmolLM2's GGUF) and write
         train.npy / val.npy (uint16 token streams, documents separated by <|endoftext|>) and
         heldout.txt (held-out prose for the llama.cpp-vs-torch check). WikiText is never used:
         it is lacq's judge text.
  pack   train.npy.xz (lzma, at most --max-tokens tokens in evenly spaced blocks) and val.npy in
         --pack-dir, for a GPU host that takes at most 64 MiB a call with the repository.
  train  train the model with torch (--device cuda or cpu) for a fixed time budget and/or step
         count, bf16 autocast on CUDA; write weights.npz (F16 matrices, F32 norms).
  gguf   write the F16 GGUF with gguf-py: general.architecture llama, the llama.* hyperparameters
         and SmolLM2's tokenizer.* metadata copied verbatim.
  card   beside the GGUF: NAME.json (configuration, training log, data statistics, and the torch
         perplexity of the GGUF's own weights on held-out text) and NAME-heldout.txt (that text), which
         the e2e test compares with llama-perplexity's.
  ppl    perplexity of the weights in torch on a text, scored as llama-perplexity scores it
         (chunks of 512 tokens, the second half of each chunk), to check the GGUF against llama.cpp.
  all    data, train, gguf, card in a row.

The model follows llama.cpp's LLAMA graph exactly: RMSNorm, rotary embeddings on interleaved pairs
(llama.cpp's "norm" rope for arch llama, so the q/k weights are written without the permutation
convert_hf_to_gguf applies to HF checkpoints), SiLU-gated FFN, grouped-query attention with
consecutive query heads sharing a KV head, and the output tied to token_embd. Widths are multiples
of 256 so the k-quants apply as on real models. Seeds are fixed; with --steps the run is
deterministic up to the GPU's kernels, with a time budget the step count depends on the machine.

  python3 scripts/make_clean_base.py all --device cuda --work build/clean-base -o data/models/lacq-clean-base-f16.gguf
"""

from __future__ import annotations

import argparse
import gzip
import hashlib
import html.parser
import io
import json
import lzma
import math
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np

EOT = 0  # SmolLM2's <|endoftext|>: separates documents in the token streams
VAL_EVERY = 50  # one document in 50 (by a hash of its name) is held out
HELDOUT_CHARS = 400_000  # prose written to heldout.txt for the llama.cpp check


@dataclass(frozen=True)
class Config:
    vocab: int = 49152
    dim: int = 256
    ffn: int = 768
    layers: int = 8
    heads: int = 4
    kv_heads: int = 2
    ctx: int = 1024
    rope_base: float = 10000.0
    eps: float = 1e-5

    @property
    def head_dim(self) -> int:
        return self.dim // self.heads


# ---------------------------------------------------------------- data: Debian text packages

# (package, extractor, paths inside the package). All are English documentation or dictionaries
# shipped by Debian 12; none holds Wikipedia text.
SOURCES = (
    ("python3.11-doc", "rst", "usr/share/doc/python3.11/html/_sources/**/*.rst.txt"),
    ("postgresql-doc-15", "html", "usr/share/doc/postgresql-doc-15/html/*.html"),
    ("debian-handbook", "html", "usr/share/doc/debian-handbook/html/en-US/*.html"),
    ("debian-reference-en", "html", "usr/share/debian-reference/*.en.html"),
    ("perl-doc", "pod", "usr/share/perl/*/pod/*.pod"),
    ("git-doc", "asciidoc", "usr/share/doc/git-doc/*.txt"),
    ("gnu-standards", "plain", "usr/share/doc/gnu-standards/*.text.gz"),
    ("linux-doc-6.1", "rst", "usr/share/doc/linux-doc-6.1/Documentation/**/*.rst.gz"),
    ("dict-gcide", "dict", "usr/share/dictd/gcide.dict.dz"),
    ("dict-foldoc", "dict", "usr/share/dictd/foldoc.dict.dz"),
    ("dict-jargon", "dict", "usr/share/dictd/jargon.dict.dz"),
)


def _read(path: Path) -> str:
    raw = gzip.decompress(path.read_bytes()) if path.suffix in (".gz", ".dz") else path.read_bytes()
    return raw.decode("utf-8", errors="replace")


def _paragraphs(text: str) -> str:
    """Collapse runs of blank lines and trailing spaces."""
    lines = [ln.rstrip() for ln in text.splitlines()]
    return re.sub(r"\n{3,}", "\n\n", "\n".join(lines)).strip()


_ROLE = re.compile(r":[a-z:+-]+:`~?!?([^`<]*?)(?:\s*<[^>]*>)?`")
_DIRECTIVE = re.compile(r"^\s*\.\. ")
_UNDERLINE = re.compile(r"^\s*([=\-~^\"'`#*+.:_])\1{2,}\s*$")


def rst_text(text: str) -> str:
    """reST to prose: roles become their text, directives, field lines and title underlines go."""
    out = []
    for line in text.splitlines():
        if _DIRECTIVE.match(line) or _UNDERLINE.match(line) or re.match(r"^\s*:[\w -]+:( |$)", line):
            continue
        line = _ROLE.sub(r"\1", line)
        line = re.sub(r"`([^`<]+?)(?:\s*<[^>]*>)?`_{0,2}", r"\1", line.replace("``", "`"))
        out.append(line.replace("\\", ""))
    return _paragraphs("\n".join(out))


class _HtmlText(html.parser.HTMLParser):
    BLOCK = frozenset({"p", "div", "br", "li", "tr", "h1", "h2", "h3", "h4", "h5", "h6", "pre", "dt", "dd", "table",
                       "title"})
    SKIP = frozenset({"script", "style", "head", "nav"})

    def __init__(self) -> None:
        super().__init__(convert_charrefs=True)
        self.parts: list[str] = []
        self.skip = 0

    def handle_starttag(self, tag, attrs):
        if tag in self.SKIP:
            self.skip += 1
        elif tag in self.BLOCK:
            self.parts.append("\n\n")

    def handle_endtag(self, tag):
        if tag in self.SKIP:
            self.skip = max(0, self.skip - 1)
        elif tag in self.BLOCK:
            self.parts.append("\n\n")

    def handle_data(self, data):
        if not self.skip:
            self.parts.append(data)


def html_text(text: str) -> str:
    parser = _HtmlText()
    parser.feed(text)
    joined = "".join(parser.parts)
    paras = (re.sub(r"[ \t\r\n]+", " ", p).strip() for p in joined.split("\n\n"))
    return "\n\n".join(p for p in paras if p)


def pod_text(text: str) -> str:
    """POD to prose: headings keep their text, formatting codes their content, other commands go."""
    out = []
    for line in text.splitlines():
        if line.startswith("="):
            cmd, _, rest = line.partition(" ")
            if cmd.startswith(("=head", "=item")) and rest:
                out.append(rest)
            continue
        out.append(line)
    body = "\n".join(out)
    for _ in range(3):  # nested codes such as B<C<x>>
        body = re.sub(r"[A-Z]<<+\s*(.*?)\s*>+>", r"\1", body)
        body = re.sub(r"[A-Z]<([^<>]*)>", lambda m: m.group(1).split("|")[-1], body)
    return _paragraphs(body)


def asciidoc_text(text: str) -> str:
    lines = [ln for ln in text.splitlines() if not re.match(r"^\s*([=\-~^+.'`]){3,}\s*$", ln)
             and not ln.startswith(("include::", "ifdef::", "endif::", "ifndef::", "[["))]
    body = re.sub(r"(linkgit:)?([\w-]+)\[(\d)\]", r"\2(\3)", "\n".join(lines))
    return _paragraphs(body.replace("`", "").replace("'", "'"))


def dict_entries(text: str, per_doc: int = 200) -> list[str]:
    """A dictd database as documents of `per_doc` entries: markup of pronunciations and sources removed."""
    text = re.sub(r"\s*\[(1913 Webster|PJC|WordNet 1\.5|Century Dict\.|Webster 1913 Suppl\.)[^\]]*\]", "", text)
    text = re.sub(r"\\[^\\\n]*\\", "", text)  # \Ab*jure"\ pronunciations
    text = text.replace("{", "").replace("}", "")
    entries = [e.strip() for e in re.split(r"\n(?=\S)", text) if e.strip()]
    docs = []
    for i in range(0, len(entries), per_doc):
        docs.append(_paragraphs("\n".join(entries[i:i + per_doc])))
    return docs


EXTRACT = {"rst": rst_text, "html": html_text, "pod": pod_text, "asciidoc": asciidoc_text, "plain": _paragraphs}


def fetch_packages(workdir: Path) -> Path:
    """Download (not install) and unpack every source package; returns the folder of unpacked trees."""
    debs, root = workdir / "debs", workdir / "unpacked"
    debs.mkdir(parents=True, exist_ok=True)
    root.mkdir(parents=True, exist_ok=True)
    for package, _, _ in SOURCES:
        if (root / package).is_dir():
            continue
        if not list(debs.glob(f"{package}_*.deb")):
            subprocess.run(["apt-get", "download", package], cwd=debs, check=True, stdout=subprocess.DEVNULL)
        (deb,) = debs.glob(f"{package}_*.deb")
        tmp = Path(tempfile.mkdtemp(dir=root))
        subprocess.run(["dpkg-deb", "-x", str(deb), str(tmp)], check=True)
        tmp.rename(root / package)
    return root


def documents(root: Path) -> list[tuple[str, str]]:
    """(name, text) for every document of every source, in a fixed order."""
    docs: list[tuple[str, str]] = []
    for package, kind, pattern in SOURCES:
        files = sorted(p for p in (root / package).glob(pattern) if p.is_file())
        if not files:
            raise SystemExit(f"make_clean_base: {package} has no files matching {pattern}")
        for path in files:
            rel = f"{package}/{path.relative_to(root / package)}"
            if kind == "dict":
                docs += [(f"{rel}#{i}", t) for i, t in enumerate(dict_entries(_read(path)))]
            else:
                text = EXTRACT[kind](_read(path))
                if len(text) > 200:
                    docs.append((rel, text))
    return docs


def is_heldout(name: str) -> bool:
    return int(hashlib.sha256(name.encode()).hexdigest(), 16) % VAL_EVERY == 0


def load_tokenizer(gguf_path: Path):
    """SmolLM2's byte-level BPE rebuilt from its GGUF metadata, split as llama.cpp's 'smollm' pre-tokenizer does
    (each digit alone, then the GPT-2 pattern)."""
    import gguf
    from tokenizers import AddedToken, Tokenizer, decoders, models, pre_tokenizers

    reader = gguf.GGUFReader(str(gguf_path))
    tokens = reader.fields["tokenizer.ggml.tokens"].contents()
    merges = [tuple(m.split(" ", 1)) for m in reader.fields["tokenizer.ggml.merges"].contents()]
    types = reader.fields["tokenizer.ggml.token_type"].contents()
    tok = Tokenizer(models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges))
    tok.pre_tokenizer = pre_tokenizers.Sequence([pre_tokenizers.Digits(individual_digits=True),
                                                 pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    tok.decoder = decoders.ByteLevel()
    tok.add_special_tokens([AddedToken(t, special=True) for t, ty in zip(tokens, types) if ty == 3])
    return tok


def encode(tok, texts: list[str]) -> list[list[int]]:
    return [e.ids for e in tok.encode_batch(texts, add_special_tokens=False)]


def make_data(workdir: Path, smollm2_gguf: Path) -> None:
    root = fetch_packages(workdir)
    docs = documents(root)
    tok = load_tokenizer(smollm2_gguf)
    train_docs = [t for n, t in docs if not is_heldout(n)]
    val_docs = [(n, t) for n, t in docs if is_heldout(n)]
    stats = {}
    for name, texts in (("train", train_docs), ("val", [t for _, t in val_docs])):
        ids: list[int] = []
        for start in range(0, len(texts), 2000):
            for seq in encode(tok, texts[start:start + 2000]):
                ids.extend(seq)
                ids.append(EOT)
        arr = np.asarray(ids, dtype=np.uint16)
        np.save(workdir / f"{name}.npy", arr)
        stats[name] = {"documents": len(texts), "tokens": int(arr.size), "chars": sum(map(len, texts))}
    # Held-out prose (no dictionaries, no code-heavy pages first) for the llama.cpp check.
    prose = [t for n, t in val_docs if not n.startswith("dict-")]
    (workdir / "heldout.txt").write_text("\n\n".join(prose)[:HELDOUT_CHARS] + "\n")
    per_source: dict[str, int] = {}
    for n, t in docs:
        per_source[n.split("/", 1)[0]] = per_source.get(n.split("/", 1)[0], 0) + len(t)
    stats["chars_per_package"] = per_source
    (workdir / "data.json").write_text(json.dumps(stats, indent=1))
    print(json.dumps(stats, indent=1))


# ---------------------------------------------------------------- model (torch)

def build_model(cfg: Config):
    import torch
    import torch.nn.functional as F
    from torch import nn

    class RMSNorm(nn.Module):
        def __init__(self, dim: int):
            super().__init__()
            self.weight = nn.Parameter(torch.ones(dim))

        def forward(self, x):
            xf = x.float()
            return (xf * torch.rsqrt(xf.pow(2).mean(-1, keepdim=True) + cfg.eps)).type_as(x) * self.weight

    def rope(x, cos, sin):
        # llama.cpp's rope for arch llama rotates interleaved pairs (x[2i], x[2i+1]) by pos * base^(-2i/d).
        x0, x1 = x[..., 0::2].float(), x[..., 1::2].float()
        out = torch.stack((x0 * cos - x1 * sin, x0 * sin + x1 * cos), dim=-1)
        return out.flatten(-2).type_as(x)

    class Block(nn.Module):
        def __init__(self):
            super().__init__()
            hd = cfg.head_dim
            self.attn_norm, self.ffn_norm = RMSNorm(cfg.dim), RMSNorm(cfg.dim)
            self.wq = nn.Linear(cfg.dim, cfg.heads * hd, bias=False)
            self.wk = nn.Linear(cfg.dim, cfg.kv_heads * hd, bias=False)
            self.wv = nn.Linear(cfg.dim, cfg.kv_heads * hd, bias=False)
            self.wo = nn.Linear(cfg.heads * hd, cfg.dim, bias=False)
            self.gate = nn.Linear(cfg.dim, cfg.ffn, bias=False)
            self.up = nn.Linear(cfg.dim, cfg.ffn, bias=False)
            self.down = nn.Linear(cfg.ffn, cfg.dim, bias=False)

        def forward(self, x, cos, sin):
            b, t, _ = x.shape
            hd = cfg.head_dim
            h = self.attn_norm(x)
            q = rope(self.wq(h).view(b, t, cfg.heads, hd), cos, sin).transpose(1, 2)
            k = rope(self.wk(h).view(b, t, cfg.kv_heads, hd), cos, sin).transpose(1, 2)
            v = self.wv(h).view(b, t, cfg.kv_heads, hd).transpose(1, 2)
            # Query head i uses KV head i // (heads / kv_heads), as llama.cpp's GQA does.
            rep = cfg.heads // cfg.kv_heads
            k, v = k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1)
            a = F.scaled_dot_product_attention(q, k, v, is_causal=True)
            x = x + self.wo(a.transpose(1, 2).reshape(b, t, cfg.heads * hd))
            h = self.ffn_norm(x)
            return x + self.down(F.silu(self.gate(h)) * self.up(h))

    class Llama(nn.Module):
        def __init__(self):
            super().__init__()
            self.embed = nn.Embedding(cfg.vocab, cfg.dim)
            self.blocks = nn.ModuleList(Block() for _ in range(cfg.layers))
            self.norm = RMSNorm(cfg.dim)
            inv = cfg.rope_base ** (-torch.arange(0, cfg.head_dim, 2, dtype=torch.float64) / cfg.head_dim)
            ang = torch.arange(cfg.ctx, dtype=torch.float64)[:, None] * inv[None, :]
            self.register_buffer("cos", ang.cos().float()[:, None, :], persistent=False)  # (t, 1, hd/2)
            self.register_buffer("sin", ang.sin().float()[:, None, :], persistent=False)

        def forward(self, idx):
            t = idx.shape[1]
            x = self.embed(idx)
            for blk in self.blocks:
                x = blk(x, self.cos[:t], self.sin[:t])
            return self.norm(x) @ self.embed.weight.T  # output tied to token_embd

    return Llama()


def init_weights(model, cfg: Config) -> None:
    import torch
    for name, p in model.named_parameters():
        if p.dim() == 2:
            std = 0.02 / math.sqrt(2 * cfg.layers) if name.endswith(("wo.weight", "down.weight")) else 0.02
            torch.nn.init.normal_(p, std=std)


# GGUF tensor names for the torch parameter names (llama.cpp's LLAMA tensors).
_GGUF_NAMES = {"attn_norm.weight": "attn_norm", "ffn_norm.weight": "ffn_norm", "wq.weight": "attn_q",
               "wk.weight": "attn_k", "wv.weight": "attn_v", "wo.weight": "attn_output",
               "gate.weight": "ffn_gate", "up.weight": "ffn_up", "down.weight": "ffn_down"}


def gguf_name(torch_name: str) -> str:
    if torch_name == "embed.weight":
        return "token_embd.weight"
    if torch_name == "norm.weight":
        return "output_norm.weight"
    _, layer, rest = torch_name.split(".", 2)
    return f"blk.{int(layer)}.{_GGUF_NAMES[rest]}.weight"


def export_weights(model) -> dict[str, np.ndarray]:
    """GGUF-named arrays: matrices F16 (as the F16 GGUF stores them), norms F32."""
    out = {}
    for name, p in model.named_parameters():
        a = p.detach().float().cpu().numpy()
        out[gguf_name(name)] = a.astype(np.float16) if a.ndim == 2 else a.astype(np.float32)
    return out


def load_weights(cfg: Config, weights: dict[str, np.ndarray]):
    import torch
    model = build_model(cfg)
    state = {name: torch.from_numpy(weights[gguf_name(name)].astype(np.float32)) for name, _ in model.named_parameters()}
    model.load_state_dict(state, strict=False)
    return model


# ---------------------------------------------------------------- training

def train(cfg: Config, data: Path, out: Path, device: str, budget_s: float, max_steps: int, batch: int,
          lr: float, seed: int, eval_every: int, warmup: int) -> None:
    import torch
    import torch.nn.functional as F

    torch.manual_seed(seed)
    # The token streams live on the device: a batch is gathered there from random offsets.
    train_tok = torch.from_numpy(np.load(data / "train.npy").astype(np.int64)).to(device)
    val_tok = torch.from_numpy(np.load(data / "val.npy").astype(np.int64)).to(device)
    window = torch.arange(cfg.ctx + 1, device=device)
    model = build_model(cfg).to(device)
    init_weights(model, cfg)
    decay = [p for p in model.parameters() if p.dim() == 2]
    no_decay = [p for p in model.parameters() if p.dim() < 2]
    opt = torch.optim.AdamW([{"params": decay, "weight_decay": 0.1}, {"params": no_decay, "weight_decay": 0.0}],
                            lr=lr, betas=(0.9, 0.95), eps=1e-8, fused=device.startswith("cuda"))
    gen = torch.Generator().manual_seed(seed)
    # bf16 autocast on both: on a CPU with AVX512-BF16 it doubles the matrix rate (the tied head dominates).
    amp = torch.autocast("cuda" if device.startswith("cuda") else "cpu", dtype=torch.bfloat16)

    def batch_of(tokens, n, g):
        starts = torch.randint(0, tokens.numel() - cfg.ctx - 1, (n,), generator=g).to(device)
        rows = tokens[starts[:, None] + window]
        return rows[:, :-1], rows[:, 1:]

    @torch.no_grad()
    def val_loss(n_batches=8):
        model.eval()
        g = torch.Generator().manual_seed(seed + 1)
        total = 0.0
        for _ in range(n_batches):
            x, y = batch_of(val_tok, batch, g)
            with amp:
                total += F.cross_entropy(model(x).float().flatten(0, 1), y.flatten()).item()
        model.train()
        return total / n_batches

    log = []
    best = (float("inf"), None, 0)
    t0, step = time.time(), 0
    while True:
        elapsed = time.time() - t0
        progress = max(step / max_steps if max_steps else 0.0, elapsed / budget_s if budget_s else 0.0)
        if progress >= 1.0:
            break
        # Linear warm-up, then cosine to a tenth, on whichever of steps or time runs out first.
        scale = min(1.0, (step + 1) / warmup) * (0.1 + 0.45 * (1 + math.cos(math.pi * progress)))
        for group in opt.param_groups:
            group["lr"] = lr * scale
        x, y = batch_of(train_tok, batch, gen)
        with amp:
            loss = F.cross_entropy(model(x).float().flatten(0, 1), y.flatten())
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        opt.step()
        step += 1
        if step % eval_every == 0:
            v = val_loss()
            entry = {"step": step, "s": round(time.time() - t0, 1), "train": round(loss.item(), 4), "val": round(v, 4),
                     "tokens": step * batch * cfg.ctx}
            log.append(entry)
            print(json.dumps(entry), flush=True)
            if v < best[0]:
                best = (v, export_weights(model), step)
    v = val_loss()
    log.append({"step": step, "s": round(time.time() - t0, 1), "val": round(v, 4), "tokens": step * batch * cfg.ctx})
    print(json.dumps(log[-1]), flush=True)
    weights, kept = (export_weights(model), step) if v <= best[0] else (best[1], best[2])
    out.mkdir(parents=True, exist_ok=True)
    np.savez(out / "weights.npz", **weights)
    meta = {"config": asdict(cfg), "steps": step, "kept_step": kept, "batch": batch, "lr": lr, "seed": seed,
            "budget_s": budget_s, "warmup": warmup, "device": device, "torch": torch.__version__, "log": log,
            "gpu": torch.cuda.get_device_name() if device.startswith("cuda") else None}
    (out / "train.json").write_text(json.dumps(meta, indent=1))


def split_file(path: Path, part_bytes: int) -> list[Path]:
    """Cut a file into numbered parts (for transports that limit file sizes); join with join_parts."""
    parts = []
    with open(path, "rb") as src:
        for i in range(1000):
            block = src.read(part_bytes)
            if not block:
                break
            part = path.with_name(f"{path.name}.part{i:02d}")
            part.write_bytes(block)
            parts.append(part)
    path.unlink()
    return parts


def join_parts(first_part: Path, dest: Path) -> None:
    stem = first_part.name.rsplit(".part", 1)[0]
    with open(dest, "wb") as out:
        out.writelines(part.read_bytes() for part in sorted(first_part.parent.glob(stem + ".part*")))


# ---------------------------------------------------------------- GGUF

def write_gguf(cfg: Config, weights: dict[str, np.ndarray], smollm2_gguf: Path, out: Path, name: str) -> None:
    import gguf

    src = gguf.GGUFReader(str(smollm2_gguf))
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_name(out.name + ".tmp")
    w = gguf.GGUFWriter(str(tmp), "llama")
    w.add_name(name)
    w.add_type("model")
    w.add_block_count(cfg.layers)
    w.add_context_length(cfg.ctx)
    w.add_embedding_length(cfg.dim)
    w.add_feed_forward_length(cfg.ffn)
    w.add_head_count(cfg.heads)
    w.add_head_count_kv(cfg.kv_heads)
    w.add_rope_freq_base(cfg.rope_base)
    w.add_layer_norm_rms_eps(cfg.eps)
    w.add_vocab_size(cfg.vocab)
    w.add_rope_dimension_count(cfg.head_dim)
    w.add_file_type(gguf.LlamaFileType.MOSTLY_F16)
    for key, field in src.fields.items():
        if not key.startswith("tokenizer."):
            continue
        vtype = field.types[0]
        if vtype == gguf.GGUFValueType.ARRAY:
            w.add_key_value(key, field.contents(), vtype, sub_type=field.types[-1])
        else:
            w.add_key_value(key, field.contents(), vtype)
    for tname in sorted(weights, key=_tensor_order):
        w.add_tensor(tname, weights[tname])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()
    os.replace(tmp, out)


def _tensor_order(name: str):
    if name.startswith("blk."):
        return (1, int(name.split(".")[1]), name)
    return (0 if name == "token_embd.weight" else 2, 0, name)


def read_gguf_weights(path: Path) -> dict[str, np.ndarray]:
    import gguf
    reader = gguf.GGUFReader(str(path))
    return {t.name: np.array(t.data).reshape([int(d) for d in reversed(t.shape)]) for t in reader.tensors}


# ---------------------------------------------------------------- perplexity as llama-perplexity computes it

def torch_ppl(cfg: Config, weights: dict[str, np.ndarray], tokens: np.ndarray, ctx: int, chunks: int) -> dict:
    """llama-perplexity's estimate: per chunk of `ctx` tokens, the mean NLL of tokens ctx/2+1 .. ctx-1
    (no BOS: SmolLM2's tokenizer sets add_bos_token false), over `chunks` chunks."""
    import torch
    import torch.nn.functional as F
    model = load_weights(cfg, weights).eval()
    n = min(chunks, tokens.size // ctx)
    nll, count = 0.0, 0
    with torch.no_grad():
        for c in range(n):
            x = torch.from_numpy(tokens[c * ctx:(c + 1) * ctx].astype(np.int64))[None]
            logp = F.log_softmax(model(x).double(), dim=-1)[0]
            first = ctx // 2
            tgt = x[0, first + 1:]
            nll -= logp[first:ctx - 1].gather(1, tgt[:, None]).sum().item()
            count += tgt.numel()
    return {"chunks": n, "tokens_scored": count, "ppl": math.exp(nll / count)}


def pack_for_gpu(work: Path, dest: Path, max_tokens: int) -> None:
    """train.npy.xz (lzma) and val.npy in `dest`, for a GPU host whose uploads are limited: at most `max_tokens`
    training tokens, taken as evenly spaced blocks of 2^19 so that every source package stays in."""
    tokens = np.load(work / "train.npy")
    block = 1 << 19
    n_blocks = tokens.size // block
    keep = min(n_blocks, max_tokens // block)
    picks = np.linspace(0, n_blocks - 1, keep).round().astype(int) if keep < n_blocks else np.arange(n_blocks)
    subset = np.concatenate([tokens[i * block:(i + 1) * block] for i in picks])
    dest.mkdir(parents=True, exist_ok=True)
    with open(dest / "train.npy.xz", "wb") as out:
        buf = io.BytesIO()
        np.save(buf, subset)
        out.write(lzma.compress(buf.getvalue(), preset=6))
    shutil.copy(work / "val.npy", dest / "val.npy")
    print(f"{dest}: {subset.size} training tokens, {(dest / 'train.npy.xz').stat().st_size / 1e6:.1f} MB")


CHUNKS_E2E = 4  # the e2e test's llama-perplexity run: short on 2 cores


def write_card(gguf_path: Path, work: Path, smollm2_gguf: Path, chunks: int) -> None:
    """NAME.json and NAME-heldout.txt beside the GGUF: how it was made and what torch says it computes."""
    cfg = Config(**json.loads((work / "train.json").read_text())["config"])
    stem = gguf_path.name.removesuffix(".gguf").removesuffix("-f16")
    text_path = gguf_path.with_name(f"{stem}-heldout.txt")
    tok = load_tokenizer(smollm2_gguf)
    full = (work / "heldout.txt").read_text()
    # Enough held-out prose for `chunks` chunks of 512 tokens, cut at a paragraph.
    ids = encode(tok, [full])[0]
    need = len(tok.decode(ids[:chunks * 512 + 64]))
    cut = full.find("\n\n", need)
    text_path.write_text(full[:cut if cut > 0 else len(full)] + "\n")
    tokens = np.asarray(encode(tok, [text_path.read_text()])[0], dtype=np.uint16)
    weights = read_gguf_weights(gguf_path)
    card = {
        "model": gguf_path.name, "config": asdict(cfg),
        "training": {k: v for k, v in json.loads((work / "train.json").read_text()).items() if k != "config"},
        "data": json.loads((work / "data.json").read_text()),
        "heldout": {"text": text_path.name, "tokens": int(tokens.size), "ctx": 512,
                    "chunks": chunks, "torch_ppl": torch_ppl(cfg, weights, tokens, 512, chunks)["ppl"],
                    "chunks_e2e": CHUNKS_E2E, "torch_ppl_e2e": torch_ppl(cfg, weights, tokens, 512, CHUNKS_E2E)["ppl"]},
    }
    gguf_path.with_suffix(".json").write_text(json.dumps(card, indent=1) + "\n")
    print(json.dumps(card["heldout"]))


# ---------------------------------------------------------------- command line

def _smollm2(path: str | None) -> Path:
    if path:
        return Path(path)
    from lacq.model.resolve import smollm2
    return smollm2()


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("stage", choices=["data", "pack", "train", "gguf", "card", "ppl", "all"])
    ap.add_argument("--work", default="build/clean-base", help="work folder (data, weights)")
    ap.add_argument("--smollm2", help="SmolLM2 GGUF with the tokenizer (default: lacq's named model smollm2)")
    ap.add_argument("--device", default="cpu", help="torch device for train: cpu or cuda")
    ap.add_argument("--budget-s", type=float, default=330.0, help="training time budget in seconds (0: none)")
    ap.add_argument("--steps", type=int, default=0, help="training steps (0: until the time budget)")
    ap.add_argument("--batch", type=int, default=64, help="sequences per step")
    ap.add_argument("--lr", type=float, default=2e-3)
    ap.add_argument("--seed", type=int, default=1234)
    ap.add_argument("--eval-every", type=int, default=500)
    ap.add_argument("--warmup", type=int, default=200, help="linear warm-up steps")
    ap.add_argument("--layers", type=int, default=Config.layers)
    ap.add_argument("--ctx", type=int, default=Config.ctx, help="training context")
    ap.add_argument("--weights", help="weights.npz (default: WORK/weights.npz, joined from parts if needed)")
    ap.add_argument("-o", "--output", default="data/models/lacq-clean-base-f16.gguf")
    ap.add_argument("--name", default="lacq clean base")
    ap.add_argument("--text", help="ppl: text file (default WORK/heldout.txt)")
    ap.add_argument("--model", help="ppl: a GGUF to read the weights from instead of weights.npz")
    ap.add_argument("--chunks", type=int, default=20)
    ap.add_argument("--pack-dir", default=".gpu/clean-base", help="pack: where the GPU host's inputs go (ignored)")
    ap.add_argument("--max-tokens", type=int, default=16_000_000, help="pack: training tokens to carry")
    args = ap.parse_args(argv)
    if args.steps == 0 and args.budget_s == 0:
        ap.error("give --steps or --budget-s")
    work = Path(args.work)
    work.mkdir(parents=True, exist_ok=True)
    cfg = Config(layers=args.layers, ctx=args.ctx)
    if args.stage in ("data", "all"):
        if not shutil.which("apt-get"):
            print("make_clean_base: the data stage needs apt-get and dpkg-deb (a Debian system)", file=sys.stderr)
            return 2
        make_data(work, _smollm2(args.smollm2))
    if args.stage == "pack":
        pack_for_gpu(work, Path(args.pack_dir), args.max_tokens)
    if args.stage in ("train", "all"):
        for name in ("train.npy", "val.npy"):  # carried to a GPU host in parts, or lzma-compressed (46%)
            if not (work / name).exists() and (work / f"{name}.part00").exists():
                join_parts(work / f"{name}.part00", work / name)
            if not (work / name).exists() and (work / f"{name}.xz").exists():
                (work / name).write_bytes(lzma.decompress((work / f"{name}.xz").read_bytes()))
        train(cfg, work, work, args.device, args.budget_s, args.steps, args.batch, args.lr, args.seed, args.eval_every,
              args.warmup)
    weights_path = Path(args.weights) if args.weights else work / "weights.npz"
    if args.stage in ("gguf", "ppl", "all") and not args.model and not weights_path.exists():
        first = weights_path.with_name(weights_path.name + ".part00")
        if not first.exists():
            print(f"make_clean_base: no {weights_path} (run the train stage)", file=sys.stderr)
            return 2
        join_parts(first, weights_path)
    if args.stage in ("gguf", "all"):
        meta_path = work / "train.json"
        if meta_path.exists():
            cfg = Config(**json.loads(meta_path.read_text())["config"])
        write_gguf(cfg, dict(np.load(weights_path)), _smollm2(args.smollm2), Path(args.output), args.name)
        print(f"wrote {args.output}")
    if args.stage in ("card", "all"):
        write_card(Path(args.output), work, _smollm2(args.smollm2), args.chunks)
    if args.stage == "ppl":
        meta_path = work / "train.json"
        if meta_path.exists():
            cfg = Config(**json.loads(meta_path.read_text())["config"])
        weights = read_gguf_weights(Path(args.model)) if args.model else dict(np.load(weights_path))
        text = Path(args.text) if args.text else work / "heldout.txt"
        tokens = np.asarray(encode(load_tokenizer(_smollm2(args.smollm2)), [text.read_text()])[0], dtype=np.uint16)
        print(json.dumps(torch_ppl(cfg, weights, tokens, 512, args.chunks)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
