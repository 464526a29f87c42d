"""The roofline line every bench prints: achieved FLOP/s of a timed step against the device's ceiling.

    from roofline import Roofline
    roof = Roofline(device)                       # CPU: measures its fp32 1024^3 matmul rate once
    flops = roof.count(step)                      # torch's FLOP counter over one call of ``step``
    print(roof.line("GPT step", flops, seconds))  # "roofline GPT step: 12.3 GFLOP in 1.02 s = ..."

The ceiling is the rate a device actually reaches on a large dense matmul: on CPU it is measured in
the same run (median of 5 fp32 1024^3 matmuls after a warm-up: the ~300-360 GFLOP/s of this VM's
2 cores), on a GPU the dense bf16 peak of its name (vtok/plan/gpus.yaml; pass
``peak_tflops`` for others). FLOPs come from ``torch.utils.flop_counter.FlopCounterMode`` (matmuls,
convolutions and attention; elementwise work is not counted, so a memory-bound step reads low).
"""
from __future__ import annotations

import statistics
import time
from typing import Callable

import torch
from torch.utils.flop_counter import FlopCounterMode


def median_seconds(fn: Callable[[], object], steps: int, warmup: int, device: torch.device) -> float:
    """Median wall time of ``steps`` calls of ``fn`` after ``warmup`` untimed ones (CUDA synchronised):
    the one timing loop of the benches."""
    times = []
    for i in range(warmup + steps):
        if device.type == "cuda":
            torch.cuda.synchronize()
        t0 = time.perf_counter()
        fn()
        if device.type == "cuda":
            torch.cuda.synchronize()
        if i >= warmup:
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def matmul_rate(device: torch.device, size: int = 1024, repeats: int = 5) -> float:
    """Measured fp32 FLOP/s of a (size x size) @ (size x size) matmul on ``device`` (median)."""
    a = torch.randn(size, size, device=device)
    b = torch.randn(size, size, device=device)
    return 2 * size ** 3 / median_seconds(lambda: a @ b, repeats, 1, device)


def gemv_bandwidth(device: torch.device, total_mb: int = 512, repeats: int = 5) -> float:
    """Measured bytes/s of matrix-vector products over ``total_mb`` of distinct fp32 weights (far more
    than the caches hold): the rate at which a batch-1 decode step can stream its weights (median)."""
    mats = [torch.randn(2048, 1024, device=device) for _ in range(max(1, total_mb // 8))]
    x = torch.randn(1, 1024, device=device)

    def sweep() -> None:
        for w in mats:
            torch.nn.functional.linear(x, w)
    return sum(w.numel() * w.element_size() for w in mats) / median_seconds(sweep, repeats, 1, device)


class Roofline:
    """A device's ceiling (measured on CPU, the bf16 peak on GPUs) and lines against it."""

    def __init__(self, device: torch.device | str = "cpu", peak_tflops: float = 0.0):
        self.device = torch.device(device)
        if peak_tflops:
            self.peak, self.label = peak_tflops * 1e12, f"given {peak_tflops:g} TFLOP/s peak"
        elif self.device.type == "cuda":
            from vtok.train.trainer import device_peak_tflops

            tflops = device_peak_tflops(self.device, 0.0)
            self.peak = tflops * 1e12 if tflops else matmul_rate(self.device, 4096)
            self.label = (f"{torch.cuda.get_device_name(self.device)} bf16 peak" if tflops
                          else "measured fp32 4096^3 matmul rate")
        else:
            self.peak = matmul_rate(self.device)
            self.label = f"measured fp32 1024^3 matmul rate ({self.peak / 1e9:.0f} GFLOP/s, {torch.get_num_threads()} threads)"

    def memory_floor(self, weight_bytes: float, reads: int) -> tuple[float, str]:
        """Seconds to stream ``weight_bytes`` from memory ``reads`` times at the measured matrix-vector
        rate (``gemv_bandwidth``, measured on first use): the floor of a weight-bound step such as
        batch-1 decoding, which reads every weight once per token. Returns (seconds, description)."""
        if not hasattr(self, "bandwidth"):
            self.bandwidth = gemv_bandwidth(self.device)
        seconds = weight_bytes * reads / self.bandwidth
        return seconds, (f"{weight_bytes / 1e6:.0f} MB of weights x {reads} reads at the measured "
                         f"{self.bandwidth / 1e9:.1f} GB/s matrix-vector rate = {seconds:.3f} s")

    @staticmethod
    def count(fn: Callable[[], object]) -> float:
        """FLOPs of one call of ``fn`` (forward and, if it runs one, backward) by torch's counter."""
        with FlopCounterMode(display=False) as counter:
            fn()
        return float(counter.get_total_flops())

    def line(self, name: str, flops: float, seconds: float) -> str:
        """'roofline NAME: F GFLOP in T = R GFLOP/s, P% of the ceiling'."""
        rate = flops / seconds if seconds > 0 else 0.0
        return (f"roofline {name}: {flops / 1e9:.2f} GFLOP in {seconds * 1e3:.1f} ms = {rate / 1e9:.1f} GFLOP/s, "
                f"{100 * rate / self.peak:.0f}% of the {self.label}")
