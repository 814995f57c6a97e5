"""Where the masked-LM head runs: on the encoder's device, or on the host in fp32.

The head's decoder is a [C, V] matmul per masked row plus a top-k over V; whether it pays to
run it next to the encoder or to move the few hidden rows to the host depends on the device
and the batch. `resolve_mlm_mode` is the policy for `auto`, one table per device type.
"""

from __future__ import annotations

import enum


class MlmExecMode(str, enum.Enum):
    AUTO = "auto"
    CPU = "cpu"  # move the needed hidden rows to the host, run the head there in fp32
    IN_GRAPH = "in_graph"  # run the head on the encoder's device, in the encoder's dtype


# device type -> largest batch (sequences) for which in_graph is chosen; above it: cpu.
# cpu: the encoder already runs on the host, so in_graph is the host path without a copy.
# cuda: reference table (in_graph for batch <= 8, cpu above) until measured on our GPUs.
IN_GRAPH_MAX_BATCH: dict[str, int | None] = {
    "cpu": None,  # None = always in_graph
    "cuda": 8,
}


def resolve_mlm_mode(mode: MlmExecMode | str, device_type: str, batch: int) -> MlmExecMode:
    """`auto` -> cpu or in_graph for this device type and batch size; other modes unchanged."""
    mode = MlmExecMode(mode)
    if mode is not MlmExecMode.AUTO:
        return mode
    limit = IN_GRAPH_MAX_BATCH.get(device_type, 8)
    if limit is None or batch <= limit:
        return MlmExecMode.IN_GRAPH
    return MlmExecMode.CPU
