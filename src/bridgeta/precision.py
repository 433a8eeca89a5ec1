"""Mixed precision and memory format: one reading of ``train.precision`` for training and evaluation."""

from __future__ import annotations

import contextlib

import torch

PRECISIONS = ("auto", "fp32", "bf16", "fp16")
MEMORY_FORMATS = ("auto", "contiguous", "channels_last")


def cpu_has_native_bf16() -> bool:
    """True where the CPU computes bf16 in hardware (AVX512-BF16 or AMX), so oneDNN runs bf16
    convolutions and matmuls natively instead of emulating them."""
    checks = (getattr(torch.cpu, "_is_avx512_bf16_supported", None), getattr(torch.cpu, "_is_amx_tile_supported", None))
    return any(check is not None and bool(check()) for check in checks)


def autocast_dtype(precision: str, device: torch.device) -> torch.dtype | None:
    """The autocast dtype of ``precision`` on ``device``; None = plain fp32.

    ``auto`` is bf16 on a CUDA device that supports it and on a CPU with native bf16 (measured
    faster there, with validation mIoU unchanged within seed noise: ``bridgeta bench precision``,
    docs/engine.md), fp32 elsewhere (emulated bf16 is slower than fp32).
    """
    if precision not in PRECISIONS:
        raise ValueError(f"precision must be one of {PRECISIONS}, got {precision!r}")
    if precision == "auto":
        if device.type == "cuda":
            bf16 = torch.cuda.is_bf16_supported()
        else:
            bf16 = device.type == "cpu" and cpu_has_native_bf16()
        return torch.bfloat16 if bf16 else None
    return {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[precision]


def use_channels_last(memory_format: str, precision: str, device: torch.device) -> bool:
    """Whether ``train.memory_format`` puts the model in channels-last.

    ``auto``: on a CPU training in bf16, where oneDNN's bf16 convolutions are fastest on NHWC; in
    fp32 or on CUDA the gain was not measured, so the layout stays contiguous there.
    """
    if memory_format not in MEMORY_FORMATS:
        raise ValueError(f"memory_format must be one of {MEMORY_FORMATS}, got {memory_format!r}")
    if memory_format == "auto":
        return device.type == "cpu" and autocast_dtype(precision, device) is torch.bfloat16
    return memory_format == "channels_last"


def autocast_context(device: torch.device, precision: str) -> contextlib.AbstractContextManager:
    """Run the block in exactly ``precision``, also inside an enclosing autocast region (fp32
    switches an outer bf16 autocast off, e.g. for a frozen teacher inside a bf16 training step)."""
    dtype = autocast_dtype(precision, device)
    return torch.autocast(device.type, dtype=dtype or torch.float32, enabled=dtype is not None)
