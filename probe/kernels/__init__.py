"""Fused Triton kernels for headwise attention, and the backend choice between them and eager.

On CUDA, with Triton importable and a layer plan and attention call the kernel supports
(:func:`plan_supported`, :func:`call_supported`: no softcap, learned sinks or score bias), :mod:`probe.runtime`
runs :func:`fused_attend` (one flash-style pass with edits and statistics, plus the
received-attention kernel); otherwise the chunked PyTorch engine :func:`probe.eager.attend`.
Both give the same outputs and statistics (the eager engine defines them; see the tests).
Triton is imported lazily, so this package loads on machines without it.
Set ``HEADWISE_KERNELS=0`` to force the eager engine; ``HEADWISE_KERNELS=interpret`` together with
``TRITON_INTERPRET=1`` sends CPU tensors through the kernels in the Triton interpreter (tests only: slow).

>>> from probe.kernels import kernel_backend
>>> kernel_backend(__import__("torch").zeros(1)) is None  # CPU tensors use the eager engine
True
"""
from __future__ import annotations

import importlib.util
import os

from .ops import call_supported, fused_attend, plan_supported  # noqa: F401  (triton is imported inside the launchers)
from .reference import reference_attend  # noqa: F401


def triton_available() -> bool:
    return importlib.util.find_spec("triton") is not None


def kernel_backend(tensor, plan=None, call=None) -> str | None:
    """``"triton"`` when ``tensor`` (with ``plan`` and the model's ``call``) can go through the fused kernel
    here, else ``None``: the kernel is never given an attention argument it does not implement."""
    if os.environ.get("HEADWISE_KERNELS", "1") == "0":
        return None
    on_device = tensor.is_cuda or os.environ.get("TRITON_INTERPRET") == "1" and os.environ.get(
        "HEADWISE_KERNELS") == "interpret"
    if not on_device or not triton_available() or plan_supported(plan) is not None \
            or call_supported(call, plan) is not None:
        return None
    return "triton"
