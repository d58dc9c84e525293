"""One wrapper per llama.cpp tool: argv builder, runner, pure parser."""

from __future__ import annotations

from types import ModuleType

from lacq.llama.tools import bench, completion, kld, perplexity, quantize

REGISTRY: dict[str, ModuleType] = {
    "llama-quantize": quantize,
    "llama-perplexity": perplexity,
    "llama-perplexity --kl-divergence": kld,
    "llama-bench": bench,
    "llama-completion": completion,
}


def wrapper(name: str) -> ModuleType:
    try:
        return REGISTRY[name]
    except KeyError:
        raise KeyError(f"no wrapper for {name!r}; known tools: {', '.join(sorted(REGISTRY))}") from None
