"""Training precision: what ``auto`` means on this machine, and the autocast context.

Autocast covers training steps and the per-epoch validation early stopping follows; the
metrics a checkpoint records are measured in fp32 on its saved weights (:mod:`.loop`)."""

from __future__ import annotations

from typing import Any

import torch

from graphopt.errors import GraphoptError

__all__ = ["resolve_precision", "autocast"]


def resolve_precision(precision: str, device: torch.device) -> str:
    """``auto`` -> fp16 on CUDA, bf16 on CPUs with native bf16 (AVX512-BF16/AMX), else fp32."""
    if precision != "auto":
        if precision == "fp16" and device.type != "cuda":
            raise GraphoptError("fp16 training needs a CUDA device (CPU fp16 is slower than fp32); use bf16 or fp32")
        return precision
    if device.type == "cuda":
        return "fp16"
    try:
        native_bf16 = bool(torch.ops.mkldnn._is_mkldnn_bf16_supported())
    except (AttributeError, RuntimeError):
        native_bf16 = False
    return "bf16" if native_bf16 else "fp32"


def autocast(precision: str, device: torch.device) -> Any:
    """``torch.autocast`` for ``precision`` (a disabled one for fp32)."""
    if precision == "fp32":
        return torch.autocast(device.type, enabled=False)
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return torch.autocast(device.type, dtype=dtype)
