"""Read a GGUF model's layers, KV layers and tensors with the `gguf` package.

`inspect_model(path)` returns a frozen `ModelInfo`; `ModelInfo.to_dict()` /
`ModelInfo.from_dict()` round-trip it through JSON so recipes can be resolved
and tested without the model file.

Which blocks own an attention KV cache (`kv_blocks`) mirrors
`llama_model::create_memory` and the per-arch `load_arch_hparams` of the pinned
llama.cpp (src/llama-model.cpp, src/models/*.cpp):

- no KV at all: encoder / diffusion models for which create_memory returns no
  memory (bert family, gemma-embedding, dream, llada, rnd1, wavtokenizer-dec)
  and the purely recurrent archs (mamba, mamba2, rwkv6/6qwen2/7, arwkv7);
- "interval": qwen3next, qwen35, qwen35moe, qwen4exp, minimax-01 read
  `{arch}.attention.recurrent_layers` (per-layer flags) if present, else a
  block is attention iff (i + 1) % `{arch}.full_attention_interval` == 0
  (default 4);
- "head_count_kv > 0": jamba, plamo2, granitehybrid, lfm2, lfm2moe,
  kimi-linear, kimi-k3, bailingmoe3, glm5-next mark a block recurrent when its
  entry of the per-layer `{arch}.attention.head_count_kv` array is 0;
- nemotron_h, nemotron_h_moe: attention iff head_count_kv > 0 and the block's
  feed_forward_length entry is 0 (blocks with neither are MLP blocks);
- falcon-h1: every block has attention and SSM side by side; deepseek4 (its own
  compressed iSWA cache) also counts every trunk block;
- gemma3n: only the first 20 blocks allocate KV (hard-coded
  n_layer_kv_from_start); later blocks reuse it. gemma4: the first
  block_count - `{arch}.attention.shared_kv_layers` blocks;
- every other arch (iSWA ones included: both caches count): every block.

Which KV blocks use the sliding-window cache of an iSWA model (`swa_blocks`,
`swa_window`) mirrors the per-arch `load_swa_pattern(ml, n_pattern, dense_first)`
calls and `llama_hparams::set_swa_pattern` (src/llama-hparams.cpp): a per-layer
`{arch}.attention.sliding_window_pattern` array wins; else an integer pattern n
(that key, or the arch's default) makes block i sliding-window iff i % n < n - 1
(the last of every n is global; gemma3: n = 6, blocks 5, 11, 17 global), or with
dense_first iff i % n != 0; n = 0 makes every block sliding-window. Such models
keep two caches; KV-layer ordinals count over both, in block order.

Blocks appended for multi-token prediction (`{arch}.nextn_predict_layers`) are
excluded: the main context's cache filters them out. An arch we do not know
whose metadata looks hybrid (recurrent_layers, full_attention_interval, ssm.*
keys, or zeros in head_count_kv) is resolved by the same generic rules where
they apply; otherwise kv_rule starts with "unknown" and kv_ordinal_map() refuses.
"""

from __future__ import annotations

import logging
import math
import os
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import gguf

from lacq.errors import GGUFError

# Far above any real model (the largest have a few hundred blocks); bounds the per-block lists.
MAX_BLOCKS = 65536
from lacq.model.reader import RawTensor, read_gguf

log = logging.getLogger(__name__)

_NO_KV_ARCHS = {
    "bert", "modern-bert", "nomic-bert", "nomic-bert-moe", "neo-bert", "jina-bert-v2",
    "jina-bert-v3", "eurobert", "wavtokenizer-dec", "gemma-embedding", "dream", "llada",
    "llada-moe", "rnd1",
    "mamba", "mamba2", "rwkv6", "rwkv6qwen2", "rwkv7", "arwkv7",
}
_INTERVAL_ARCHS = {"qwen3next", "qwen35", "qwen35moe", "qwen4exp", "minimax-01"}
_HEAD_KV_ARCHS = {
    "jamba", "plamo2", "granitehybrid", "lfm2", "lfm2moe", "kimi-linear", "kimi-k3",
    "bailingmoe3", "glm5-next",
}
_NEMOTRON_H_ARCHS = {"nemotron_h", "nemotron_h_moe"}
_ALL_BLOCKS_HYBRID = {"falcon-h1", "deepseek4"}

# iSWA archs: (default sliding_window_pattern, dense_first, default window or None, needs a window key > 0).
# Only archs whose load_arch_hparams turns SWA on from metadata alone; exaone4, exaone-moe,
# smallthinker, llama4 (chunked) and phi3 decide otherwise and are not listed.
_SWA_ARCHS = {
    "gemma3": (6, False, None, True), "gemma2": (2, False, 4096, False), "gemma-embedding": (6, False, None, False),
    "cohere2": (4, False, None, False), "cohere2moe": (4, True, None, False), "gpt-oss": (2, False, None, False),
    "olmo2": (4, False, None, True), "plamo3": (8, False, None, True), "afmoe": (4, False, None, True),
    "mellum": (4, False, None, True), "laguna": (4, True, None, True), "muse-glimmer": (4, False, None, False),
}

# The unquantized ggml types (everything else in a weight or KV cache is quantized).
FLOAT_TYPES = frozenset({"f32", "f16", "bf16"})

_BLOCK_RE = re.compile(r"^blk\.(\d+)\.(.+)$")
_SUFFIX_RE = re.compile(r"\.(weight|bias|scale)$")


@dataclass(frozen=True)
class TensorInfo:
    name: str
    block: int | None
    group: str  # name without "blk.N." and ".weight": attn_q, ffn_down, token_embd, ...
    type: str  # lower-case ggml type name: q4_0, f16, f32, ...
    shape: tuple[int, ...]  # ggml order: shape[0] is the row length (ne0)
    n_elements: int
    n_bytes: int


@dataclass(frozen=True)
class ModelInfo:
    path: str
    architecture: str
    name: str | None
    file_type: str | None
    n_blocks: int
    n_head: int | tuple[int, ...]
    n_head_kv: int | tuple[int, ...]
    head_dim: int
    head_dim_v: int
    n_ctx_train: int | None
    n_embd: int
    n_vocab: int | None
    n_expert: int
    kv_blocks: tuple[int, ...]
    kv_rule: str
    tensors: tuple[TensorInfo, ...] = field(repr=False)
    total_bytes: int
    bpw: float
    swa_window: int | None = None  # tokens of the sliding window; None: no sliding-window cache
    swa_blocks: tuple[int, ...] = ()  # KV blocks in the sliding-window cache; the other KV blocks are global

    @property
    def is_iswa(self) -> bool:
        """Whether the model keeps two KV caches: sliding-window and full-context blocks."""
        return self.swa_window is not None and bool(self.swa_blocks)

    @property
    def is_quantized(self) -> bool:
        """Whether any weight matrix is stored in a quantized type."""
        return any(t.type not in FLOAT_TYPES for t in self.tensors if len(t.shape) > 1)

    def tensors_by_block(self) -> dict[int | None, list[TensorInfo]]:
        out: dict[int | None, list[TensorInfo]] = {}
        for t in self.tensors:
            out.setdefault(t.block, []).append(t)
        return out

    def tensor(self, name: str) -> TensorInfo:
        for t in self.tensors:
            if t.name == name:
                return t
        raise KeyError(name)

    def kv_ordinal_map(self) -> dict[int, int]:
        """block index -> KV-layer ordinal (its index among blocks that own KV)."""
        if self.kv_rule.startswith("unknown"):
            raise GGUFError(f"{self.path}: cannot tell which layers of '{self.architecture}' own a KV cache ({self.kv_rule})")
        return {block: i for i, block in enumerate(self.kv_blocks)}

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> ModelInfo:
        d = dict(d)
        for key in ("n_head", "n_head_kv"):
            if isinstance(d[key], list):
                d[key] = tuple(d[key])
        d["kv_blocks"] = tuple(d["kv_blocks"])
        d["swa_blocks"] = tuple(d.get("swa_blocks", ()))
        d["tensors"] = tuple(TensorInfo(**{**t, "shape": tuple(t["shape"])}) for t in d["tensors"])
        return cls(**d)


def tensor_nbytes(type_name: str, n_elements: int) -> int:
    qtype = gguf.GGMLQuantizationType[type_name.upper()]
    block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
    return n_elements // block_size * type_size


def inspect_model(path: str | os.PathLike) -> ModelInfo:
    """The model's architecture, blocks, KV layers and tensors (cached by file identity)."""
    f = read_gguf(path)
    path = Path(path)
    # The header parses, but the data may be cut short: compare offsets with the size.
    tensors = tuple(_tensor_info(t) for t in f.tensors)
    data_end = max((f.data_offset + r.offset + t.n_bytes for r, t in zip(f.tensors, tensors)), default=0)
    if data_end > f.file_size:
        raise GGUFError(f"{path}: truncated GGUF: tensor data ends at byte {data_end}, file has {f.file_size}")
    meta = f.metadata
    arch = meta.get(gguf.Keys.General.ARCHITECTURE)
    if not isinstance(arch, str):
        raise GGUFError(f"{path}: no {gguf.Keys.General.ARCHITECTURE}")

    def key(template: str) -> str:
        return template.format(arch=arch)

    n_blocks = meta.get(key(gguf.Keys.LLM.BLOCK_COUNT))
    if not isinstance(n_blocks, int):
        raise GGUFError(f"{path}: no {key(gguf.Keys.LLM.BLOCK_COUNT)}")
    # Lists are built per block below: a hostile count must not become a list of billions.
    if not 0 <= n_blocks <= MAX_BLOCKS:
        raise GGUFError(f"{path}: {key(gguf.Keys.LLM.BLOCK_COUNT)} = {n_blocks} is not a block count "
                        f"(0 to {MAX_BLOCKS})")
    n_embd = int(meta.get(key(gguf.Keys.LLM.EMBEDDING_LENGTH), 0))
    n_head = _int_or_tuple(meta.get(key(gguf.Keys.Attention.HEAD_COUNT), 0))
    n_head_kv = _int_or_tuple(meta.get(key(gguf.Keys.Attention.HEAD_COUNT_KV), n_head))
    first_heads = max(n_head) if isinstance(n_head, tuple) else n_head
    head_dim = int(meta.get(key(gguf.Keys.Attention.KEY_LENGTH)) or (n_embd // first_heads if first_heads else 0))
    head_dim_v = int(meta.get(key(gguf.Keys.Attention.VALUE_LENGTH)) or head_dim)
    n_vocab = meta.get(key(gguf.Keys.LLM.VOCAB_SIZE)) or f.array_len(gguf.Keys.Tokenizer.LIST)
    if n_vocab is None:
        embd = next((t for t in tensors if t.name == "token_embd.weight"), None)
        n_vocab = embd.shape[1] if embd and len(embd.shape) > 1 else None
    kv_blocks, kv_rule = _kv_blocks(arch, n_blocks, meta)
    swa_window, swa_blocks = _swa(arch, n_blocks, kv_blocks, meta)
    total = sum(t.n_bytes for t in tensors)
    n_el = sum(t.n_elements for t in tensors)
    return ModelInfo(
        path=str(path),
        architecture=arch,
        name=meta.get(gguf.Keys.General.NAME),
        file_type=_file_type_name(meta.get(gguf.Keys.General.FILE_TYPE)),
        n_blocks=n_blocks,
        n_head=n_head,
        n_head_kv=n_head_kv,
        head_dim=head_dim,
        head_dim_v=head_dim_v,
        n_ctx_train=meta.get(key(gguf.Keys.LLM.CONTEXT_LENGTH)),
        n_embd=n_embd,
        n_vocab=n_vocab,
        n_expert=int(meta.get(key(gguf.Keys.LLM.EXPERT_COUNT)) or 0),
        kv_blocks=kv_blocks,
        kv_rule=kv_rule,
        tensors=tensors,
        total_bytes=total,
        bpw=round(8 * total / n_el, 4) if n_el else 0.0,
        swa_window=swa_window,
        swa_blocks=swa_blocks,
    )


def _swa(arch: str, n_blocks: int, kv_blocks: tuple[int, ...],
         meta: dict[str, Any]) -> tuple[int | None, tuple[int, ...]]:
    """(window, the KV blocks in the sliding-window cache), or (None, ()) without one."""
    if arch not in _SWA_ARCHS:
        return None, ()
    n_pattern, dense_first, default_window, needs_window = _SWA_ARCHS[arch]
    window = meta.get(gguf.Keys.Attention.SLIDING_WINDOW.format(arch=arch), default_window)
    if window is None or (needs_window and int(window) <= 0):
        return None, ()
    pattern = meta.get(gguf.Keys.Attention.SLIDING_WINDOW_PATTERN.format(arch=arch), n_pattern)
    if isinstance(pattern, list):  # per-layer flags
        is_swa = [bool(v) for v in pattern] + [False] * (n_blocks - len(pattern))
    else:
        n = int(pattern)
        is_swa = [n == 0 or (i % n != 0 if dense_first else i % n < n - 1) for i in range(n_blocks)]
    return int(window), tuple(b for b in kv_blocks if is_swa[b])


def _int_or_tuple(value: Any) -> int | tuple[int, ...]:
    if isinstance(value, list):
        return tuple(int(v) for v in value)
    return int(value or 0)


def _tensor_info(t: RawTensor) -> TensorInfo:
    type_name = gguf.GGMLQuantizationType(t.type).name.lower()
    m = _BLOCK_RE.match(t.name)
    block, rest = (int(m.group(1)), m.group(2)) if m else (None, t.name)
    n_elements = math.prod(t.shape)
    return TensorInfo(
        name=t.name,
        block=block,
        group=_SUFFIX_RE.sub("", rest),
        type=type_name,
        shape=t.shape,
        n_elements=n_elements,
        n_bytes=tensor_nbytes(type_name, n_elements),
    )


def _file_type_name(value: Any) -> str | None:
    if value is None:
        return None
    try:
        name = gguf.LlamaFileType(int(value)).name
    except ValueError:
        return str(value)
    return name.removeprefix("MOSTLY_").removeprefix("ALL_")


def _per_layer(value: Any, n: int) -> list[int] | None:
    if value is None:
        return None
    if isinstance(value, list):
        return [int(v) for v in value] + [0] * (n - len(value))
    return [int(value)] * n


def _kv_blocks(arch: str, n_blocks: int, meta: dict[str, Any]) -> tuple[tuple[int, ...], str]:
    # The main context never attends the multi-token-prediction blocks appended at the end.
    n_trunk = n_blocks - int(meta.get(gguf.Keys.LLM.NEXTN_PREDICT_LAYERS.format(arch=arch)) or 0)
    trunk = range(n_trunk)
    head_kv = _per_layer(meta.get(gguf.Keys.Attention.HEAD_COUNT_KV.format(arch=arch)), n_blocks)
    recurrent = meta.get(f"{arch}.attention.recurrent_layers")  # not in gguf.Keys (0.19)
    interval = meta.get(gguf.Keys.LLM.FULL_ATTENTION_INTERVAL.format(arch=arch))

    def by_interval(default: int | None) -> tuple[tuple[int, ...], str] | None:
        if isinstance(recurrent, list):
            if len(recurrent) < n_trunk:
                raise GGUFError(f"{arch}.attention.recurrent_layers has {len(recurrent)} entries for {n_trunk} blocks")
            return tuple(i for i in trunk if not recurrent[i]), "attention.recurrent_layers == 0"
        step = int(interval) if interval is not None else default
        if step is None:
            return None
        return tuple(i for i in trunk if (i + 1) % step == 0), f"(i + 1) % full_attention_interval ({step}) == 0"

    if arch in _NO_KV_ARCHS:
        return (), "none: no attention KV cache"
    if arch in _INTERVAL_ARCHS:
        return by_interval(4)  # type: ignore[return-value]
    if arch in _HEAD_KV_ARCHS:
        return tuple(i for i in trunk if head_kv and head_kv[i] > 0), "head_count_kv > 0"
    if arch in _NEMOTRON_H_ARCHS:
        n_ff = _per_layer(meta.get(gguf.Keys.LLM.FEED_FORWARD_LENGTH.format(arch=arch)), n_blocks) or [0] * n_blocks
        return (tuple(i for i in trunk if head_kv and head_kv[i] > 0 and n_ff[i] == 0),
                "head_count_kv > 0 and feed_forward_length == 0")
    if arch in _ALL_BLOCKS_HYBRID:
        return tuple(trunk), "all blocks (attention beside SSM)"
    if arch == "gemma3n":
        return tuple(range(min(20, n_trunk))), "first 20 blocks (n_layer_kv_from_start)"
    if arch == "gemma4":
        shared = int(meta.get(gguf.Keys.Attention.SHARED_KV_LAYERS.format(arch=arch)) or 0)
        return tuple(range(n_blocks - shared)), "blocks before attention.shared_kv_layers"

    # An arch this module does not list: apply the generic hybrid rules its metadata implies.
    generic = by_interval(None)
    if generic is not None:
        return generic[0], "inferred: " + generic[1]
    if head_kv and any(h == 0 for h in head_kv[:n_trunk]) and any(h > 0 for h in head_kv[:n_trunk]):
        return tuple(i for i in trunk if head_kv[i] > 0), "inferred: head_count_kv > 0"
    if any(k.startswith(f"{arch}.ssm.") or k.startswith(f"{arch}.shortconv.") for k in meta):
        log.warning("%s: hybrid-looking metadata but no known KV layer rule", arch)
        return (), "unknown: recurrent metadata without a known attention-layer rule"
    return tuple(trunk), "all blocks"
