"""Progress reporting: TensorBoard scalars, MoE routing statistics, and the MFU denominator."""

from __future__ import annotations

import time
from typing import Any

import torch

from neuraflex_ray.models.moe import MoEStats

# Dense bf16 peak (datasheet, without sparsity). H100/H200 are the SXM parts; PCIe H100 is lower.
GPU_PEAK_BF16 = {"H100 PCIe": 756e12, "H100": 989e12, "H200": 989e12, "A100": 312e12, "L4": 121e12, "A10G": 70e12}


def datasheet_bf16_peak(device_name: str) -> float:
    """The dense bf16 FLOP/s of a known GPU part by its name; NaN (MFU unknown) for any other."""
    return next((peak for key, peak in GPU_PEAK_BF16.items() if key in device_name), float("nan"))


def measure_peak_flops(device: torch.device, threads: int, seconds: float = 0.5, repeats: int = 5,
                       shape: tuple[int, int, int] = (1024, 1024, 1024)) -> float:
    """FLOP/s the denominator of MFU uses.

    GPU: the datasheet dense bf16 figure for known parts, NaN (MFU unknown) for others. CPU: there is
    no datasheet figure we can trust, so time an fp32 matmul of `shape` (m, k, n) with the worker's
    thread count, here, in this run, and keep the *best* of `repeats` timed bursts: a busy moment
    (another process, Ray starting up) only ever slows a burst down, so the maximum is the machine's
    rate and the mean is not. A measured rate is below the theoretical peak, so MFU reads high.
    """
    if device.type == "cuda":
        return datasheet_bf16_peak(torch.cuda.get_device_name(device))
    torch.set_num_threads(threads)
    m, k, n = shape
    a, b = torch.randn(m, k, device=device), torch.randn(k, n, device=device)
    a @ b  # warm-up
    best = 0.0
    for _ in range(repeats):
        iters, start = 0, time.perf_counter()
        while time.perf_counter() - start < seconds / repeats:
            a @ b
            iters += 1
        best = max(best, 2 * m * k * n * iters / (time.perf_counter() - start))
    return best


def format_eta(seconds: float) -> str:
    seconds = int(max(0, seconds))
    h, rem = divmod(seconds, 3600)
    m, s = divmod(rem, 60)
    return f"{h}h{m:02d}m" if h else f"{m}m{s:02d}s"


class MetricsWriter:
    """Rank 0's TensorBoard writer."""

    def __init__(self, log_dir: str):
        from torch.utils.tensorboard import SummaryWriter

        self.tb = SummaryWriter(log_dir=log_dir)

    def scalars(self, prefix: str, values: dict[str, Any], step: int) -> None:
        for k, v in values.items():
            if k != "step" and isinstance(v, (int, float)):
                self.tb.add_scalar(f"{prefix}/{k}", v, step)

    def moe_layers(self, stats: list[MoEStats], step: int) -> None:
        """Per MoE layer: share of tokens per expert, the busiest share and the coefficient of variation,
        aux loss, z-loss, dropped-token share."""
        from neuraflex_ray.models.moe import load_cv_of

        for i, s in enumerate(stats):
            for e, frac in enumerate(s.expert_fraction.tolist()):
                self.tb.add_scalar(f"moe/layer{i}/expert{e}_fraction", frac, step)
            self.tb.add_scalar(f"moe/layer{i}/max_load", float(s.expert_fraction.max()), step)
            self.tb.add_scalar(f"moe/layer{i}/load_cv", load_cv_of(s.expert_fraction), step)
            self.tb.add_scalar(f"moe/layer{i}/aux_loss", float(s.aux_loss), step)
            self.tb.add_scalar(f"moe/layer{i}/z_loss", float(s.z_loss), step)
            self.tb.add_scalar(f"moe/layer{i}/dropped_fraction", float(s.dropped_fraction), step)

    def close(self) -> None:
        self.tb.flush()
        self.tb.close()
