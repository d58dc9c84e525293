"""An importance matrix file (llama-imatrix's GGUF): which tensors it covers, and whether it fits a model.

llama-imatrix writes, per weight it saw in a matrix multiplication, `<weight>.in_sum2` (F32, shape
[columns, matrices]) and `<weight>.counts`, with `general.type = "imatrix"`. It collects only `blk.*`
weights (the output matrix only with --process-output), and llama-quantize quantizes the token
embedding and the output matrix without one, so those are never required here.
"""

from __future__ import annotations

import os
from collections.abc import Iterable
from dataclasses import dataclass

from lacq.errors import GGUFError, ImatrixError
from lacq.model.info import ModelInfo
from lacq.model.reader import read_gguf

_SUFFIX = ".in_sum2"
# Quantized without importance data by llama.cpp (tensor_requires_imatrix exempts them; llama-imatrix skips them).
NOT_COLLECTED = frozenset({"token_embd.weight", "per_layer_token_embd.weight", "output.weight"})


@dataclass(frozen=True)
class Imatrix:
    path: str
    columns: dict[str, tuple[int, int]]  # weight name -> (columns, matrices: experts or 1)
    chunk_count: int | None
    chunk_size: int | None
    datasets: tuple[str, ...]


def read_imatrix(path: str | os.PathLike) -> Imatrix:
    """The weights an imatrix GGUF covers; ImatrixError for a file that is not one."""
    try:
        f = read_gguf(path)
    except GGUFError as exc:
        raise ImatrixError(f"{path} is not an importance matrix: {str(exc).removeprefix(f'{path}: ')}") from None
    columns = {t.name[:-len(_SUFFIX)]: (t.shape[0], t.shape[1] if len(t.shape) > 1 else 1)
               for t in f.tensors if t.name.endswith(_SUFFIX)}
    if f.get("general.type") != "imatrix" or not columns:
        what = f.get("general.architecture") or f.get("general.type") or "unknown"
        raise ImatrixError(f"{path} is not an importance matrix (a GGUF of type {what!s:.40} with "
                           f"{len(columns)} .in_sum2 tensors); make one with `lacq imatrix MODEL`")
    datasets = f.get("imatrix.datasets") or []
    return Imatrix(str(path), columns, f.get("imatrix.chunk_count"), f.get("imatrix.chunk_size"),
                   tuple(str(d) for d in datasets) if isinstance(datasets, list) else ())


def check_imatrix(imatrix: Imatrix, model: ModelInfo, quantized: Iterable[str], model_name: str = "the model") -> None:
    """Refuse an imatrix made from another model (a weight the model lacks, or of another width) or one that
    lacks a weight in `quantized` (the tensors a plan quantizes) that llama.cpp would want data for."""
    tensors = {t.name: t for t in model.tensors}
    foreign = []
    for name, (cols, mats) in imatrix.columns.items():
        t = tensors.get(name)
        if t is None:
            foreign.append(f"{name} (not in {model_name})")
        elif (t.shape[0], t.shape[2] if len(t.shape) > 2 else 1) != (cols, mats):
            foreign.append(f"{name} ({cols} columns in the imatrix, {t.shape[0]} in {model_name})")
    if foreign:
        raise ImatrixError(f"{imatrix.path} was made from another model: {len(foreign)} of its "
                           f"{len(imatrix.columns)} weights do not fit {model_name}, e.g. {foreign[0]}")
    missing = sorted(n for n in quantized if n not in imatrix.columns and n not in NOT_COLLECTED)
    if missing:
        raise ImatrixError(f"{imatrix.path} has no data for {len(missing)} tensor(s) the plan quantizes, "
                           f"e.g. {missing[0]}; make it from this model with `lacq imatrix`")
