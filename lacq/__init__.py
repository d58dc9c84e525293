"""lacq: layer-adaptive quantization studies for llama.cpp and GGUF."""

__version__ = "0.1.0"
