"""Where the masked-LM head runs: on the encoder's device, or on the host in fp32.

The head's decoder is a [C, V] matmul per masked row plus a top-k over V; whether it pays to
run it next to the encoder or to move the few hidden rows to the host depends on the device
and the batch. `resolve_mlm_mode` is the policy for `auto`, one table per device type.
"""

from __future__ import annotations

import enum


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
