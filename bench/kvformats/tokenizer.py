"""Minimal tokenizers read from GGUF metadata, enough to feed WikiText-2 to the numpy forward pass.

gpt2 (SmolLM2): llama.cpp's byte-level BPE with the `smollm` pre-tokenizer regexes
(src/llama-vocab.cpp, LLAMA_VOCAB_PRE_TYPE_SMOLLM). llama (gemma3): llama.cpp's SPM tokenizer
(spaces to U+2581, greedy merge of the adjacent pair whose merge has the highest score, byte
fallback). Special/control tokens in the text are not parsed (WikiText-2 has none).
"""

from __future__ import annotations

import heapq

import gguf
import regex

SMOLLM_REGEXES = [
    r"\p{N}",
    r"'s|'t|'re|'ve|'m|'ll|'d| ?\p{L}+| ?\p{N}+| ?[^\s\p{L}\p{N}]+|\s+(?!\S)",
]


def _field(reader: gguf.GGUFReader, key: str, default=None):
    f = reader.fields.get(key)
    return default if f is None else f.contents()


def _bytes_to_unicode() -> dict[int, str]:
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, map(chr, cs)))


class Gpt2Bpe:
    def __init__(self, reader: gguf.GGUFReader):
        tokens = _field(reader, "tokenizer.ggml.tokens")
        self.vocab = {t: i for i, t in enumerate(tokens)}
        merges = _field(reader, "tokenizer.ggml.merges")
        self.ranks = {tuple(m.split(" ", 1)): r for r, m in enumerate(merges)}
        self.byte_map = _bytes_to_unicode()
        self.add_bos = bool(_field(reader, "tokenizer.ggml.add_bos_token", False))
        self.bos = _field(reader, "tokenizer.ggml.bos_token_id")
        self.cache: dict[str, list[int]] = {}

    def _split(self, text: str) -> list[str]:
        pieces = [text]
        for rx in SMOLLM_REGEXES:
            out = []
            for p in pieces:
                pos = 0
                for m in regex.finditer(rx, p):
                    if m.start() > pos:
                        out.append(p[pos:m.start()])
                    out.append(m.group())
                    pos = m.end()
                if pos < len(p):
                    out.append(p[pos:])
            pieces = out
        return pieces

    def _bpe(self, word: str) -> list[int]:
        if word in self.cache:
            return self.cache[word]
        sym = [self.byte_map[b] for b in word.encode("utf-8")]
        while len(sym) > 1:
            best = None
            for i in range(len(sym) - 1):
                r = self.ranks.get((sym[i], sym[i + 1]))
                if r is not None and (best is None or r < best[0]):
                    best = (r, i)
            if best is None:
                break
            i = best[1]
            sym[i:i + 2] = [sym[i] + sym[i + 1]]
        ids = [self.vocab[s] for s in sym]
        self.cache[word] = ids
        return ids

    def encode(self, text: str) -> list[int]:
        ids = [self.bos] if self.add_bos else []
        for w in self._split(text):
            ids.extend(self._bpe(w))
        return ids


class Spm:
    def __init__(self, reader: gguf.GGUFReader):
        tokens = _field(reader, "tokenizer.ggml.tokens")
        self.scores = list(_field(reader, "tokenizer.ggml.scores"))
        types = list(_field(reader, "tokenizer.ggml.token_type"))
        # only normal (1) and user-defined (4) tokens take part in merges, as llama.cpp's
        # token_to_id lookup finds any text, but control/byte tokens never match plain text
        self.vocab = {t: i for i, t in enumerate(tokens) if types[i] in (1, 4)}
        self.byte_ids = {i: self.vocab_any(tokens, f"<0x{i:02X}>") for i in range(256)}
        self.add_bos = bool(_field(reader, "tokenizer.ggml.add_bos_token", False))
        self.bos = _field(reader, "tokenizer.ggml.bos_token_id")
        self.space_prefix = bool(_field(reader, "tokenizer.ggml.add_space_prefix", True))

    @staticmethod
    def vocab_any(tokens, s):
        try:
            return tokens.index(s)
        except ValueError:
            return None

    def encode(self, text: str) -> list[int]:
        text = text.replace(" ", "\u2581")
        if self.space_prefix:
            text = "\u2581" + text
        sym = list(text)
        n = len(sym)
        prev = list(range(-1, n - 1))
        nxt = list(range(1, n + 1))
        alive = [True] * n
        heap = []

        def push(i):
            j = nxt[i]
            if j >= n:
                return
            tid = self.vocab.get(sym[i] + sym[j])
            if tid is not None:
                heapq.heappush(heap, (-self.scores[tid], i, sym[i] + sym[j]))

        for i in range(n - 1):
            push(i)
        while heap:
            _, i, merged = heapq.heappop(heap)
            if not alive[i] or nxt[i] >= n or sym[i] + sym[nxt[i]] != merged:
                continue
            j = nxt[i]
            sym[i] = merged
            alive[j] = False
            nxt[i] = nxt[j]
            if nxt[j] < n:
                prev[nxt[j]] = i
            if prev[i] >= 0:
                push(prev[i])
            push(i)
        ids = [self.bos] if self.add_bos else []
        i = 0
        while i < n:
            tid = self.vocab.get(sym[i])
            if tid is not None:
                ids.append(tid)
            else:
                ids.extend(self.byte_ids[b] for b in sym[i].encode("utf-8"))
            i = nxt[i]
        return ids


def load_tokenizer(reader: gguf.GGUFReader):
    model = _field(reader, "tokenizer.ggml.model")
    if model == "gpt2":
        return Gpt2Bpe(reader)
    if model == "llama":
        return Spm(reader)
    raise ValueError(f"Expected tokenizer model gpt2 or llama, got {model!r}")
