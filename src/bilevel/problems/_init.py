"""Seeded initialisation and memory estimates shared by the experiment problems."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from ..validation import check_memory

__all__ = ["COPIES", "check_model_memory", "seeded_uniform"]

#: float64 numbers drawn at a time by :func:`seeded_uniform` (8 MB).
_CHUNK = 1 << 20

#: copies of the parameters a run holds at once (iterate, multiplier, gradients,
#: Hessian-vector products and their graphs, optimizer moments): a rough lower bound.
COPIES = 8


def seeded_uniform(shape: Sequence[int], bound: float, generator: torch.Generator, dtype: torch.dtype, device: Any = None) -> torch.Tensor:
    """``U(−bound, bound)`` of ``shape`` in ``dtype``, drawn in float64 from ``generator``.

    The numbers are those of ``(torch.rand(shape, dtype=float64) * 2 − 1) * bound`` cast to
    ``dtype`` (the same start for every dtype and device), drawn block of rows by block of
    rows so that no float64 copy of the whole tensor is ever held.
    """
    shape = tuple(int(s) for s in shape)
    out = torch.empty(shape, dtype=dtype)
    rows, per_row = shape[0], max(1, math.prod(shape[1:]))
    step = max(1, _CHUNK // per_row)
    for start in range(0, rows, step):
        block = torch.rand((min(step, rows - start), *shape[1:]), generator=generator, dtype=torch.float64)
        out[start : start + block.shape[0]] = ((block * 2 - 1) * bound).to(dtype)
    return out if device is None else out.to(device)


def check_model_memory(what: str, parameters: int, activations: int, dtype: torch.dtype, device: Any, advice: str) -> None:
    """Refuse a model whose run would not fit in host memory (CPU runs only).

    Estimate: ``COPIES × parameters + activations`` numbers of ``dtype``. ``advice``
    names what to reduce; ``use float32`` is added for float64 models.
    """
    if device is not None and torch.device(device).type != "cpu":
        return
    itemsize = torch.empty((), dtype=dtype).element_size()
    needed = (COPIES * int(parameters) + int(activations)) * itemsize
    if dtype == torch.float64:
        advice += ", or use float32 (dtype=torch.float32; config: problem.dtype=float32) to halve it"
    check_memory(f"{what} ({parameters:,} parameters in {str(dtype).replace('torch.', '')})", needed, advice)
