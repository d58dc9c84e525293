"""ctypes mirrors of the ggml structs the bit-exact reference tests read (ggml.h, ggml-cpu.h of the pinned tree)."""

from __future__ import annotations

import ctypes


class TypeTraits(ctypes.Structure):
    """struct ggml_type_traits (ggml.h): the fields up to from_float_ref."""

    _fields_ = [
        ("type_name", ctypes.c_char_p),
        ("blck_size", ctypes.c_int64),
        ("blck_size_interleave", ctypes.c_int64),
        ("type_size", ctypes.c_size_t),
        ("is_quantized", ctypes.c_bool),
        ("to_float", ctypes.c_void_p),
        ("from_float_ref", ctypes.c_void_p),
    ]
