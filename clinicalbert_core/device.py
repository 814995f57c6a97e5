"""The one precision/device policy: which device a runner may use, what precision `auto`
resolves to there, whether the varlen attention kernel runs, and where the masked-LM head runs.

Which precisions a device type runs at all is a rule the job spec checks too
(`limits.precision_problem`); what `auto` picks depends on the hardware the runner got.

The MLM head's decoder is a [C, V] matmul per masked row plus a top-k over V; whether it pays
to run it next to the encoder or to move the few hidden rows to the host depends on the device
and the batch. `resolve_mlm_mode` is the policy for `auto`, one table per device type.
"""

from __future__ import annotations

import enum
import logging
from functools import cache

import torch

from .limits import precision_problem
from .quant import int8_supported

log = logging.getLogger(__name__)

# precision -> the dtype activations (and non-int8 weights) are held in
DTYPES = {
    "fp32": torch.float32,
    "bf16": torch.bfloat16,
    "fp16": torch.float16,
    "int8": torch.float32,
}
DEVICE_TYPES = ("cpu", "cuda", "mps")


def check_device(name: str) -> torch.device:
    """`name` as a torch device this process can use; a clear error where it cannot."""
    try:
        device = torch.device(name)
    except RuntimeError:
        device = None
    if device is None or device.type not in DEVICE_TYPES:
        raise ValueError(f"device must be cpu, cuda, cuda:<index> or mps; got {name!r}")
    if device.type == "cuda" and not torch.cuda.is_available():
        raise RuntimeError("device 'cuda' was asked for but torch sees no CUDA (or ROCm) device")
    if device.type == "mps" and not torch.backends.mps.is_available():
        raise RuntimeError("device 'mps' was asked for but torch sees no Apple GPU (mps)")
    return device


def cpu_has_bf16() -> bool:
    """True when this CPU has bf16 matrix units (AMX or AVX512-BF16); else bf16 is emulated."""
    probes = ("_is_amx_tile_supported", "_is_avx512_bf16_supported")
    return any(getattr(torch.cpu, p, lambda: False)() for p in probes)


def resolve_precision(precision: str, device: torch.device, allow_int8: bool = False) -> str:
    """`auto` -> int8 on CPU only when `allow_int8`; else bf16 where the device computes it
    natively, fp16 on GPUs without bf16, fp32 on Apple's mps (its dry runs favour exact
    vectors over speed) and on CPUs without bf16 units."""
    if precision not in (*DTYPES, "auto"):
        raise ValueError(f"precision must be one of {', '.join(DTYPES)}, auto; got {precision!r}")
    if precision != "auto":
        if problem := precision_problem(device.type, precision):
            raise ValueError(problem)
        if precision == "int8" and not int8_supported():
            raise ValueError("precision int8: this torch build has no int8 GEMM on this CPU")
        return precision
    if device.type == "cuda":
        return "bf16" if torch.cuda.is_bf16_supported() else "fp16"
    if device.type == "cpu" and allow_int8 and int8_supported():
        return "int8"
    return "bf16" if device.type == "cpu" and cpu_has_bf16() else "fp32"


@cache
def varlen_supported(device: torch.device, dtype: torch.dtype) -> bool:
    """True when the varlen flash kernel runs here: CUDA, half precision, and a kernel this
    build and GPU have (not every ROCm build or pre-Ampere GPU does, and a torch whose
    `varlen_attn` lacks `window_size` cannot run it as the encoder calls it). Probed once
    (`varlen_probe`); elsewhere attention takes the padded SDPA path."""
    if device.type != "cuda" or dtype == torch.float32:
        return False
    return varlen_probe(device, dtype)


def varlen_probe(device: torch.device, dtype: torch.dtype) -> bool:
    """Make the encoder's varlen call (`attention.varlen_attention`, the same function and
    keyword arguments) on a tiny input on `device`: once with full attention, once with a
    local window as ModernBERT's local layers pass it. False, with the reason logged, when
    either raises (no module, no kernel, an argument this torch does not take)."""
    from .attention import varlen_attention

    try:
        q = torch.zeros(4, 1, 64, device=device, dtype=dtype)  # (N, H, D)
        cu = torch.tensor([0, 4], device=device, dtype=torch.int32)
        for window in (None, 1):
            varlen_attention(q, q, q, cu, 4, window)
    except Exception as exc:  # ImportError, TypeError (old signature), RuntimeError (no kernel)
        log.warning(
            "varlen attention unavailable on %s (%s: %s): attention runs as padded SDPA",
            device, type(exc).__name__, exc,
        )  # fmt: skip
        return False
    return True


# ---- where the masked-LM head runs: on the encoder's device, or on the host in fp32 ----------
class MlmExecMode(enum.StrEnum):
    AUTO = "auto"
    CPU = "cpu"  # move the needed hidden rows to the host, run the head there in fp32
    IN_GRAPH = "in_graph"  # run the head on the encoder's device, in the encoder's dtype


# device type -> largest batch (sequences) for which in_graph is chosen; above it: cpu.
# None = in_graph at every batch size. Measured with `clinicalbert bench --mlm-placement`
# (BERT-base, V=28996, 128-token sequences, 15% masked), seconds per batch:
#   cuda, H100, bf16:   batch    1: in_graph 0.0040  cpu 0.0065
#                       batch    8: in_graph 0.0039  cpu 0.0176
#                       batch  256: in_graph 0.0196  cpu 0.3409   -> in_graph always
#   cpu (2 cores, fp32): the encoder already runs on the host; `cpu` only adds an fp32 copy
#                       (batch 1: 0.187 vs 0.188, batch 4: 0.599 vs 0.610) -> in_graph always
#   cpu (2 cores AVX512-BF16, bf16): batch 1: 0.094 vs 0.126, 8: 0.682 vs 0.648,
#                       64: 5.65 vs 5.89 (within run-to-run noise) -> in_graph always
# Devices not in the table use the reference policy: in_graph for batch <= 8, cpu above.
IN_GRAPH_MAX_BATCH: dict[str, int | None] = {
    "cpu": None,
    "cuda": None,
}
DEFAULT_IN_GRAPH_MAX_BATCH = 8


def resolve_mlm_mode(mode: MlmExecMode | str, device_type: str, batch: int) -> MlmExecMode:
    """`auto` -> cpu or in_graph for this device type and batch size; other modes unchanged."""
    mode = MlmExecMode(mode)
    if mode is not MlmExecMode.AUTO:
        return mode
    limit = IN_GRAPH_MAX_BATCH.get(device_type, DEFAULT_IN_GRAPH_MAX_BATCH)
    if limit is None or batch <= limit:
        return MlmExecMode.IN_GRAPH
    return MlmExecMode.CPU
