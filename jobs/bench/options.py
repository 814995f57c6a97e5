"""What the bench's options mean: argparse types (usage errors, not tracebacks), the bf16
choice, and the check that the `bench` extra is installed."""

from __future__ import annotations

import argparse
import importlib
from collections.abc import Callable

import torch

from clinicalbert_core.device import check_device, cpu_has_bf16

BENCH_EXTRA = "clinicalbert-jobs[bench]"


def at_least(low: int) -> Callable[[str], int]:
    """An argparse type: an integer >= `low` (a usage error otherwise, not a traceback)."""

    def parse(text: str) -> int:
        try:
            value = int(text)
        except ValueError:
            raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
        if value < low:
            raise argparse.ArgumentTypeError(f"must be at least {low}, got {value}")
        return value

    parse.__name__ = f"integer >= {low}"
    return parse


def device_arg(text: str) -> torch.device:
    """An argparse type: a torch device this process can use (check_device's error otherwise)."""
    try:
        return check_device(text)
    except (ValueError, RuntimeError) as e:
        raise argparse.ArgumentTypeError(str(e)) from None


def use_bf16(args: argparse.Namespace, device: torch.device) -> bool:
    return args.bf16 == "on" or (args.bf16 == "auto" and (device.type == "cuda" or cpu_has_bf16()))


def missing_module(modules: list[str]) -> str | None:
    """The first of these python modules that cannot be imported, or None."""
    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError:
            return name
    return None
