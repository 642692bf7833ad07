"""Model FLOP utilisation for the GPU benchmarks: FLOPs of one training step counted by
PyTorch (``torch.utils.flop_counter.FlopCounterMode``: matmuls, convolutions and attention,
forward and backward), over the GPU's dense bf16 peak from a small table of data-sheet
figures (no sparsity).

On a CPU the counter has no formula for SDPA's CPU flash kernel, so attention FLOPs are left
out there; on CUDA (flash, memory-efficient and cuDNN attention) and on the ``meta`` device
(the math path: ``bmm``) they are counted."""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode

# Dense bf16 tensor-core peak, TFLOP/s, from NVIDIA's data sheets; matched as a substring of
# torch.cuda.get_device_name(), most specific first (an H100 PCIe is not an H100 SXM).
PEAK_BF16_TFLOPS: tuple[tuple[str, float], ...] = (
    ("H200", 989.0),
    ("H100 PCIe", 756.0),
    ("H100 NVL", 835.0),
    ("H100", 989.0),  # SXM
    ("GH200", 989.0),
    ("A100", 312.0),
    ("L40S", 362.0),
    ("L4", 121.0),
)


def peak_bf16_flops(device: torch.device, override_tflops: float | None = None) -> float | None:
    """The device's dense bf16 peak in FLOP/s; ``None`` for a CPU or a GPU not in the table
    (then give ``--peak-tflops``)."""
    if override_tflops:
        return override_tflops * 1e12
    if device.type != "cuda":
        return None
    name = torch.cuda.get_device_name(device)
    for key, tflops in PEAK_BF16_TFLOPS:
        if key in name:
            return tflops * 1e12
    return None


def step_flops(step: Callable[[], torch.Tensor]) -> int:
    """FLOPs of ``step()`` (a forward returning the loss) plus its backward, counted once in
    eager mode; gradients it leaves are cleared by the caller's next ``zero_grad``."""
    with FlopCounterMode(display=False) as counter:
        step().backward()
    return counter.get_total_flops()


def mfu(flops_per_step: int, steps_per_second: float, peak: float | None) -> float | None:
    """Achieved FLOP/s over the peak, or ``None`` without a peak."""
    if not peak or not flops_per_step:
        return None
    return flops_per_step * steps_per_second / peak


def format_mfu(value: float | None) -> str:
    return "n/a" if value is None else f"{100 * value:.1f}%"
