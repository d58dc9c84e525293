"""ctypes mirrors of the ggml structs the bit-exact reference tests read (ggml.h, ggml-cpu.h of the pinned tree)."""

from __future__ import annotations

import ctypes
import time
from pathlib import Path

import numpy as np


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


class _InitParams(ctypes.Structure):
    """struct ggml_init_params (ggml.h)."""

    _fields_ = [("mem_size", ctypes.c_size_t), ("mem_buffer", ctypes.c_void_p), ("no_alloc", ctypes.c_bool)]


def set_rows_seconds(base: ctypes.CDLL, cpu: ctypes.CDLL, type_id: int, use_ref: bool, rows: int = 4096) -> float:
    """The best of 3 times of one SET_ROWS of `rows` f32 rows of 256 Gaussian values into type `type_id` on a
    one-thread CPU backend, with its reference mode (ggml_backend_cpu_set_use_ref) on or off."""
    vp, i64 = ctypes.c_void_p, ctypes.c_int64
    for lib, name, restype, argtypes in (
            (base, "ggml_init", vp, [_InitParams]), (base, "ggml_new_tensor_2d", vp, [vp, ctypes.c_int, i64, i64]),
            (base, "ggml_new_tensor_1d", vp, [vp, ctypes.c_int, i64]), (base, "ggml_set_rows", vp, [vp] * 4),
            (base, "ggml_new_graph", vp, [vp]), (base, "ggml_build_forward_expand", None, [vp, vp]),
            (base, "ggml_tensor_overhead", ctypes.c_size_t, []), (base, "ggml_graph_overhead", ctypes.c_size_t, []),
            (base, "ggml_backend_alloc_ctx_tensors", vp, [vp, vp]), (base, "ggml_nbytes", ctypes.c_size_t, [vp]),
            (base, "ggml_backend_tensor_set", None, [vp, vp, ctypes.c_size_t, ctypes.c_size_t]),
            (base, "ggml_backend_graph_compute", ctypes.c_int, [vp, vp]),
            (base, "ggml_backend_buffer_free", None, [vp]), (base, "ggml_backend_free", None, [vp]),
            (base, "ggml_free", None, [vp]), (cpu, "ggml_backend_cpu_init", vp, []),
            (cpu, "ggml_backend_cpu_set_use_ref", None, [vp, ctypes.c_bool]),
            (cpu, "ggml_backend_cpu_set_n_threads", None, [vp, ctypes.c_int])):
        fn = getattr(lib, name)
        fn.restype, fn.argtypes = restype, argtypes
    f32, i64_type, ne0 = 0, 27, 256
    ctx = base.ggml_init(_InitParams(8 * base.ggml_tensor_overhead() + base.ggml_graph_overhead(), None, True))
    src, dst = base.ggml_new_tensor_2d(ctx, f32, ne0, rows), base.ggml_new_tensor_2d(ctx, type_id, ne0, rows)
    idx = base.ggml_new_tensor_1d(ctx, i64_type, rows)
    graph = base.ggml_new_graph(ctx)
    base.ggml_build_forward_expand(graph, base.ggml_set_rows(ctx, dst, src, idx))
    backend = cpu.ggml_backend_cpu_init()
    cpu.ggml_backend_cpu_set_n_threads(backend, 1)
    cpu.ggml_backend_cpu_set_use_ref(backend, use_ref)
    buf = base.ggml_backend_alloc_ctx_tensors(ctx, backend)
    x = np.random.default_rng(0).standard_normal(ne0 * rows).astype(np.float32)
    order = np.arange(rows, dtype=np.int64)
    base.ggml_backend_tensor_set(src, x.ctypes.data, 0, base.ggml_nbytes(src))
    base.ggml_backend_tensor_set(idx, order.ctypes.data, 0, base.ggml_nbytes(idx))
    best = float("inf")
    for _ in range(3):
        t0 = time.perf_counter()
        assert base.ggml_backend_graph_compute(backend, graph) == 0
        best = min(best, time.perf_counter() - t0)
    base.ggml_backend_buffer_free(buf)
    base.ggml_backend_free(backend)
    base.ggml_free(ctx)
    return best
