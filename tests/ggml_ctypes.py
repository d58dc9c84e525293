"""ctypes mirrors of the ggml structs the bit-exact reference tests read (ggml.h, ggml-cpu.h of the pinned tree)."""

from __future__ import annotations

import ctypes
from pathlib import Path


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


def load_ggml_base(path: Path, mode: int = ctypes.DEFAULT_MODE) -> ctypes.CDLL:
    """libggml-base at `path` with ggml_get_type_traits and ggml_quantize_chunk typed."""
    lib = ctypes.CDLL(str(path), mode=mode)
    lib.ggml_get_type_traits.restype = ctypes.POINTER(TypeTraits)
    lib.ggml_get_type_traits.argtypes = [ctypes.c_int]
    lib.ggml_quantize_chunk.restype = ctypes.c_size_t
    lib.ggml_quantize_chunk.argtypes = [ctypes.c_int, ctypes.c_void_p, ctypes.c_void_p,
                                        ctypes.c_int64, ctypes.c_int64, ctypes.c_int64, ctypes.c_void_p]
    return lib


def type_traits(lib: ctypes.CDLL, name: str, type_id: int) -> TypeTraits:
    """The traits of ggml type `type_id`, which must be `name`: a test that hard-codes an id fails (it is not
    skipped) when the patches move the type enum."""
    tt = lib.ggml_get_type_traits(type_id).contents
    got = tt.type_name.decode() if tt.type_name is not None else None
    assert got == name, f"ggml type {type_id} is {got!r}, not {name!r}: the type enum moved; update the test's ids"
    return tt
