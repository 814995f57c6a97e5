"""The rules a job spec and a runner are both checked against, each written once (no torch).

A window is [CLS] body [SEP]: `FRAMING_TOKENS` of its `max_seq` tokens frame it, the rest is
note. The spec (jobs/spec.py), the preflight checks and the runtime (tokenizer, runner) call
these functions; each `*_problem` returns what is wrong, or None. Where the spec words a
problem differently from the runtime (it names the field, and offers `auto`), `spec=True`
gives the spec's words.
"""

from __future__ import annotations

FRAMING_TOKENS = 2  # [CLS] and [SEP] (or the tokenizer's equivalents) around every window
STRIDE = 128  # tokens shared by consecutive windows, where a window has room for twice that


def body_tokens(length: int) -> int:
    """Note tokens in a window of `length` tokens (also elementwise on an int numpy array of
    window lengths): the window less its framing tokens."""
    return length - FRAMING_TOKENS


def default_stride(max_seq: int) -> int:
    """The stride when none is given: 128 tokens, or half a window's body for short windows
    (so that a window always moves on by at least as much as it shares)."""
    return min(STRIDE, max(body_tokens(max_seq), 0) // 2)


def stride_problem(stride: int, max_seq: int, *, spec: bool = False) -> str | None:
    """Consecutive windows share `stride` tokens: at least 0 and fewer than a window's body,
    so every window moves on."""
    body = body_tokens(max_seq)
    if 0 <= stride < body:
        return None
    if spec:
        return f"must be < max_seq - {FRAMING_TOKENS} = {body}"
    return (
        f"stride (tokens shared by consecutive windows) must be in [0, {body}) "
        f"for max_seq {max_seq}, got {stride}"
    )


def batch_tokens_problem(batch_tokens: int, max_seq: int, *, spec: bool = False) -> str | None:
    """A batch's token budget holds at least one whole window."""
    if batch_tokens >= max_seq:
        return None
    if spec:
        return f"must be >= model.max_seq ({max_seq})"
    return f"batch_tokens {batch_tokens} must be at least max_seq {max_seq}"


def max_seq_problem(max_seq: int, positions: int, *, variant: str | None = None) -> str | None:
    """A window fits the model's position table (`max_position_embeddings`). `variant`: the
    spec's words, naming the field and whose config.json sets the limit."""
    if max_seq <= positions:
        return None
    if variant is not None:
        return (
            f"model.max_seq: {max_seq} exceeds the model's max_position_embeddings "
            f"{positions} (config.json of {variant})"
        )
    return f"max_seq {max_seq} exceeds the model's max_position_embeddings {positions}"


def precision_problem(device: str, precision: str, *, spec: bool = False) -> str | None:
    """Which precisions a device type runs: fp16 not on cpu, int8 on cpu only (every other
    pair runs; `auto` resolves per device). The spec's words offer `auto` as well."""
    auto = ("auto",) if spec else ()
    prefix = "" if spec else "precision "
    if precision == "fp16" and device == "cpu":
        use = _either("fp32", "bf16", "int8", *auto)
        return f"{prefix}fp16 is not supported on cpu; use {use}"
    if precision == "int8" and device != "cpu":
        use = _either(*auto, "bf16", "fp16", "fp32")
        return f"{prefix}int8 runs on cpu only; on {device} use {use}"
    return None


def _either(*names: str) -> str:
    """`a, b or c`."""
    return f"{', '.join(names[:-1])} or {names[-1]}"
