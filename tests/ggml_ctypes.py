"""ctypes mirrors of the ggml structs the bit-exact reference tests read (ggml.h, ggml-cpu.h of the pinned tree)."""

from __future__ import annotations

import ctypes
from pathlib import Path

import pytest


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


class TypeTraitsCpu(ctypes.Structure):
    """struct ggml_type_traits_cpu (ggml-cpu.h)."""

    _fields_ = [
        ("from_float", ctypes.c_void_p),
        ("vec_dot", ctypes.c_void_p),
        ("vec_dot_type", ctypes.c_int),
        ("nrows", ctypes.c_int64),
    ]


def load_ggml_base(path: Path, type_ids: dict[str, int], mode: int = ctypes.DEFAULT_MODE) -> ctypes.CDLL:
    """libggml-base at `path` with ggml_get_type_traits and ggml_quantize_chunk typed; skips the test when the
    library lacks one of `type_ids` (name -> ggml type id)."""
    lib = ctypes.CDLL(str(path), mode=mode)
    lib.ggml_get_type_traits.restype = ctypes.POINTER(TypeTraits)
    lib.ggml_get_type_traits.argtypes = [ctypes.c_int]
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p,
                                        ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
    for name, tid in type_ids.items():
        tt = lib.ggml_get_type_traits(tid).contents
        if tt.type_name is None or tt.type_name.decode() != name:
            pytest.skip(f"{path} has no {name} type")
    return lib
