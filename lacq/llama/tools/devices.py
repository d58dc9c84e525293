"""The GPU devices a llama.cpp tool says it used, read from its log (pure).

The tool sees only the devices CUDA_VISIBLE_DEVICES leaves it and numbers them from 0, so its
own report names the GPU a run used; `nvidia-smi` without an id names GPU 0 of the host.
"""

from __future__ import annotations

import re

from lacq.llama.tools.base import message_lines

# src/llama.cpp, llama_prepare_model_devices: one line per device the model is placed on,
# "using device %s (%s) (%s) - %zu MiB free" (name, description, device id). Anchored on
# "MiB free" so that "skipping device ... already using device X (Y) with the same id" is not read.
_USING = re.compile(r"using device (\S+) \((.+)\) \([^()]*\) - \d+ MiB free\s*$")
# ggml-cuda.cu, ggml_cuda_init: "  Device %d: %s, compute capability %d.%d, VMM: ..." (CUDA) or
# "  Device %d: %s, %s (0x%x), VMM: ..." (HIP): every device the backend found, used or not.
# The Turing note's "  Device %d: %s" lines have no comma after the name and are not matched.
_FOUND = re.compile(r"^\s*Device \d+: (.+?), (?:compute capability \d+\.\d+|\S+ \(0x[0-9a-fA-F]+\)), VMM:")


def tool_devices(text: str) -> list[str]:
    """The descriptions of the GPUs the run used ("NVIDIA H100 80GB HBM3"), in the tool's order:
    the devices the model was placed on where the tool says so (llama-perplexity and other
    llama tools), else those the CUDA backend found (test-backend-ops, test-kv-bytes).
    Empty when the tool named none (a CPU build, or no layer on a GPU)."""
    lines = message_lines(text)
    used = [m.group(2) for m in map(_USING.search, lines) if m]
    if used:
        return used
    return [m.group(1) for m in map(_FOUND.match, lines) if m]
