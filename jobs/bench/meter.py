"""How every benchmark measures: best wall time over interleaved rounds, and peak memory above
the pre-call level (the CUDA allocator's peak, or the RSS high-water mark in /proc/self/status)."""

from __future__ import annotations

import gc
import subprocess
import sys
import time
from collections.abc import Callable
from typing import Any

import torch


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def status_kib(field: str) -> int:
    """A KiB field of /proc/self/status (VmRSS, VmHWM)."""
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"/proc/self/status has no {field}")


def reset_peak_rss() -> None:
    """Reset VmHWM to the current RSS (Linux: /proc/self/clear_refs)."""
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")


def timed(fn: Callable[[], Any], device: torch.device, repeats: int) -> float:
    """Best wall time of `repeats` calls after one warm-up call."""
    return timed_rounds({"fn": fn}, device, repeats)["fn"]


def timed_rounds(
    runs: dict[str, Callable[[], Any]], device: torch.device, repeats: int
) -> dict[str, float]:
    """name -> best wall time: one warm-up call each, then `repeats` rounds in which every
    run is called once in turn, so a slow spell on a shared machine hits every side alike."""
    for run in runs.values():
        run()
    sync(device)
    best = dict.fromkeys(runs, float("inf"))
    for _ in range(repeats):
        for name, run in runs.items():
            t0 = time.perf_counter()
            run()
            sync(device)
            best[name] = min(best[name], time.perf_counter() - t0)
    return best


def peak_memory(fn: Callable[[], Any], device: torch.device) -> int:
    """Bytes above the pre-call level at the high-water mark of one call.

    CUDA: the caching allocator's peak. CPU: the kernel's RSS high-water mark (VmHWM), so
    call this in a fresh process per side (see --memory-of), where no freed memory from an
    earlier side can be reused unseen.
    """
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() - base
    # reset VmHWM to the current RSS, so a transient peak while building the model is not
    # taken for the run's
    reset_peak_rss()
    base = status_kib("VmRSS")
    fn()
    return (status_kib("VmHWM") - base) * 1024


def memory_in_subprocess(name: str, argv: list[str]) -> int:
    """Peak memory of side `name` (see peak_memory), in a fresh `python -m jobs.bench` run with
    this run's arguments `argv`."""
    cmd = [sys.executable, "-m", "jobs.bench", *argv, "--memory-of", name]
    done = subprocess.run(cmd, capture_output=True, text=True, check=True)
    return int(done.stdout.strip().splitlines()[-1])
