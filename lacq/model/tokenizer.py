"""A model's tokenizer metadata: the fingerprint two models must share, chat template, special tokens."""

from __future__ import annotations

import os

import gguf

from lacq.errors import GGUFError
from lacq.model.reader import read_gguf

Tok = gguf.Keys.Tokenizer
# Scalars that change how text becomes tokens; the token list and merges are compared by hash.
_FINGERPRINT_SCALARS = (Tok.MODEL, Tok.PRE, Tok.BOS_ID, Tok.EOS_ID, Tok.ADD_BOS)
_FINGERPRINT_ARRAYS = (Tok.LIST, Tok.MERGES)


def has_tokenizer(model: str | os.PathLike) -> bool:
    f = read_gguf(model)
    return f.has(Tok.MODEL) and f.has(Tok.LIST)


def tokenizer_fingerprint(model: str | os.PathLike) -> dict:
    """What must agree between a base and a quantized model for their logits to be comparable."""
    f = read_gguf(model)
    out: dict = {key: f.get(key) for key in _FINGERPRINT_SCALARS}
    for key in _FINGERPRINT_ARRAYS:
        out[key] = f.array_sha256(key)
    return out


def chat_metadata(model: str | os.PathLike) -> tuple[str | None, str, str]:
    """(chat template, bos token text, eos token text) from the GGUF's tokenizer metadata."""
    f = read_gguf(model)

    def token_text(key: str) -> str:
        idx = f.get(key)
        return (f.string_at(Tok.LIST, int(idx)) or "") if idx is not None else ""

    template = f.get(Tok.CHAT_TEMPLATE)
    if template is not None and not isinstance(template, str):
        raise GGUFError(f"{model}: {Tok.CHAT_TEMPLATE} is not a string")
    return template, token_text(Tok.BOS_ID), token_text(Tok.EOS_ID)
