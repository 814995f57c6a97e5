"""Other CPU inference engines on the bench's BERT workload: onnxruntime and CTranslate2.

Each engine runs transformers' `BertModel` with the bench's weights, through its usual route:

- onnxruntime fp32: the model exported by torch.onnx's TorchScript exporter (`dynamo=False`,
  eager attention), then `onnxruntime.transformers.optimizer.optimize_model(model_type="bert")`.
  The fusions (EmbedLayerNormalization, Attention, BiasGelu, SkipLayerNormalization) are
  checked to have applied. The torch.export exporter (torch.onnx's default since torch 2.9)
  gives a graph in which neither the attention nor the embedding fusion matches, with SDPA or
  eager attention alike; so does the TorchScript exporter on SDPA attention.
- onnxruntime int8: `quantize_dynamic` on the optimized graph, int8 weights per output channel
  (as fast as per-tensor here, and closer to fp32), MatMul and Attention nodes only: the
  embeddings stay fp32, as in ours.
- ctranslate2 fp32 / int8: `TransformersConverter` on a saved `BertModel` dir (with a pooler
  and a tokenizer, which the converter requires), then `ctranslate2.Encoder(compute_type=
  "float32" / "int8")`. transformers 5 dropped `BertConfig.position_embedding_type`, which
  the converter asserts is "absolute"; the saved config sets it.

Every side gets the same padded batches and thread count, and is checked once against
transformers fp32 before it is timed (cosine >= 0.99 of the hidden states and of the CLS
vector, on the workload's longest and shortest sequence padded together), so a broken export
cannot post a speed.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import tempfile
import warnings
from collections.abc import Callable, Iterator
from functools import cached_property
from pathlib import Path
from typing import Any

import numpy as np
import torch

Batch = tuple[np.ndarray, np.ndarray]  # ids int64 (B, T), attention mask int64 (B, T)
Factory = Callable[[], Callable[[], None]]

MIN_COSINE = 0.99
# the python modules the peers import (all in the `bench` extra)
MODULES = ("onnx", "onnxruntime", "ctranslate2")


def sides(
    make_hf: Callable[[], Any], batches: list[Batch], threads: int
) -> dict[str, tuple[str, Factory]]:
    """name -> (precision, factory); factory() builds the engine, checks it, returns run().

    `make_hf()` returns the fp32 `BertModel` (no pooler) whose weights every engine runs;
    `batches` are what run() feeds the engine, in order.
    """
    peers = _Peers(make_hf, batches, threads)
    return {
        "onnxruntime fp32": ("fp32", lambda: peers.onnxruntime("fp32")),
        "onnxruntime int8": ("int8", lambda: peers.onnxruntime("int8")),
        "ctranslate2 fp32": ("fp32", lambda: peers.ctranslate2("float32")),
        "ctranslate2 int8": ("int8", lambda: peers.ctranslate2("int8")),
    }


def check_agreement(name: str, hidden: np.ndarray, reference: np.ndarray, mask: np.ndarray) -> None:
    """Raise RuntimeError unless `hidden` agrees with `reference` on every sequence's real tokens.

    hidden, reference: (B, T, C) last hidden states; mask: (B, T), 1 on real tokens.
    """
    for j, n in enumerate(mask.sum(axis=1)):
        for what, a, b in (("hidden states", hidden[j, :n], reference[j, :n]),
                           ("CLS vector", hidden[j, 0], reference[j, 0])):  # fmt: skip
            a, b = a.ravel().astype(np.float64), b.ravel().astype(np.float64)
            cos = float(a @ b / max(np.linalg.norm(a) * np.linalg.norm(b), 1e-30))
            if not cos >= MIN_COSINE:
                raise RuntimeError(
                    f"{name} disagrees with transformers fp32: {what} cosine {cos:.4f} < "
                    f"{MIN_COSINE} on a {n}-token sequence; not timed"
                )


@contextlib.contextmanager
def _quiet() -> Iterator[None]:
    """Silence the converters' chatter: per-node INFO logs, progress bars, the exporter's
    deprecation and tracer warnings. What they build is checked against transformers instead."""
    from transformers.utils import logging as hf_logging

    bars, disabled = hf_logging.is_progress_bar_enabled(), logging.root.manager.disable
    hf_logging.disable_progress_bar()
    logging.disable(logging.WARNING)
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            yield
    finally:
        logging.disable(disabled)
        if bars:
            hf_logging.enable_progress_bar()


class _LastHidden(torch.nn.Module):
    """BertModel with positional (input_ids, attention_mask) -> last hidden state, for export."""

    def __init__(self, model: torch.nn.Module):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids=input_ids, attention_mask=attention_mask).last_hidden_state


class _Peers:
    """What the sides share, built on first use: the reference model and outputs, the
    exported / converted models (in a temp dir that lives as long as this object)."""

    def __init__(self, make_hf: Callable[[], Any], batches: list[Batch], threads: int):
        self.make_hf, self.batches, self.threads = make_hf, batches, threads
        self.dir = tempfile.TemporaryDirectory(prefix="clinicalbert-peers-")
        self.root = Path(self.dir.name)

    @cached_property
    def hf(self) -> Any:
        return self.make_hf().float().eval()

    @cached_property
    def check_batch(self) -> Batch:
        """The first batch's first sequence and the last batch's last one (with sorted batches:
        the longest and the shortest), padded together."""
        (first, first_mask), (last, last_mask) = self.batches[0], self.batches[-1]
        seqs = [first[0, : first_mask[0].sum()], last[-1, : last_mask[-1].sum()]]
        ids = np.zeros((2, max(len(x) for x in seqs)), np.int64)
        mask = np.zeros_like(ids)
        for j, x in enumerate(seqs):
            ids[j, : len(x)], mask[j, : len(x)] = x, 1
        return ids, mask

    @cached_property
    def reference(self) -> np.ndarray:
        ids, mask = self.check_batch
        with torch.inference_mode():
            out = self.hf(input_ids=torch.from_numpy(ids), attention_mask=torch.from_numpy(mask))
        return out.last_hidden_state.numpy()

    def bert_copy(self, pooler: bool, **config: Any) -> Any:
        """A BertModel with the reference weights and its own config (changed by `config`)."""
        from transformers import BertModel

        cfg = copy.deepcopy(self.hf.config)
        for key, value in config.items():
            setattr(cfg, key, value)
        model = BertModel(cfg, add_pooling_layer=pooler).eval()
        missing, unexpected = model.load_state_dict(self.hf.state_dict(), strict=False)
        if unexpected or any(not k.startswith("pooler.") for k in missing):
            raise RuntimeError(f"weights do not fit: missing {missing}, unexpected {unexpected}")
        return model

    @cached_property
    def onnx_fp32(self) -> Path:
        """The exported graph after onnxruntime's BERT fusions."""
        from onnxruntime.transformers.optimizer import optimize_model

        cfg = self.hf.config
        model = _LastHidden(self.bert_copy(pooler=False, _attn_implementation="eager")).eval()
        raw, out = self.root / "bert.onnx", self.root / "bert.opt.onnx"
        ids, mask = self.check_batch  # traced with a padded row: no all-ones mask shortcut
        axes = {0: "batch", 1: "seq"}
        with _quiet():
            torch.onnx.export(
                model, (torch.from_numpy(ids), torch.from_numpy(mask)), str(raw), dynamo=False,
                opset_version=17, input_names=["input_ids", "attention_mask"],
                output_names=["last_hidden_state"],
                dynamic_axes={"input_ids": axes, "attention_mask": axes, "last_hidden_state": axes},
            )  # fmt: skip
            opt = optimize_model(str(raw), model_type="bert", num_heads=cfg.num_attention_heads,
                                 hidden_size=cfg.hidden_size)  # fmt: skip
            fused = opt.get_fused_operator_statistics()
            if not opt.is_fully_optimized(fused) or fused["Attention"] != cfg.num_hidden_layers:
                raise RuntimeError(f"onnxruntime's BERT fusions did not all apply: {fused}")
            opt.save_model_to_file(str(out))
        raw.unlink()
        return out

    @cached_property
    def onnx_int8(self) -> Path:
        """The fused graph with dynamic int8 quantization of its MatMul and Attention nodes."""
        import onnx
        from onnxruntime.quantization import QuantType, quantize_dynamic

        src, out = self.onnx_fp32, self.root / "bert.int8.onnx"
        with _quiet():
            quantize_dynamic(
                str(src), str(out), weight_type=QuantType.QInt8, per_channel=True,
                op_types_to_quantize=["MatMul", "Attention"],
                # shape inference cannot see through the fused (com.microsoft) nodes' outputs
                extra_options={"DefaultTensorType": onnx.TensorProto.FLOAT},
            )  # fmt: skip
        return out

    def onnxruntime(self, precision: str) -> Callable[[], None]:
        import onnxruntime as ort

        path = self.onnx_int8 if precision == "int8" else self.onnx_fp32
        options = ort.SessionOptions()
        options.intra_op_num_threads, options.inter_op_num_threads = self.threads, 1
        options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
        options.log_severity_level = 3  # errors only
        session = ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])

        def forward(ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
            return session.run(["last_hidden_state"], {"input_ids": ids, "attention_mask": mask})[0]

        check_agreement(f"onnxruntime {precision}", forward(*self.check_batch), self.reference,
                        self.check_batch[1])  # fmt: skip

        def run() -> None:
            for ids, mask in self.batches:
                forward(ids, mask)

        return run

    @cached_property
    def ct2_dir(self) -> Path:
        from ctranslate2.converters import TransformersConverter
        from transformers import BertTokenizerFast

        src, out = self.root / "hf", self.root / "ct2"
        with _quiet():
            self.bert_copy(pooler=True, position_embedding_type="absolute").save_pretrained(src)
            vocab = src / "vocab.txt"  # ids are fed directly; the converter wants a tokenizer
            vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]) + "\n")
            BertTokenizerFast(vocab_file=str(vocab)).save_pretrained(src)
            TransformersConverter(str(src)).convert(str(out))
        return out

    def ctranslate2(self, compute_type: str) -> Callable[[], None]:
        import ctranslate2

        encoder = ctranslate2.Encoder(str(self.ct2_dir), device="cpu", compute_type=compute_type,
                                      intra_threads=self.threads, inter_threads=1)  # fmt: skip

        def dense(ids: np.ndarray, mask: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            return np.ascontiguousarray(ids, np.int32), mask.sum(axis=1).astype(np.int32)

        def forward(ids: np.ndarray, lengths: np.ndarray) -> Any:
            views = ctranslate2.StorageView.from_array(ids)  # views ids' memory, no copy
            lens = ctranslate2.StorageView.from_array(lengths)
            return encoder.forward_batch(views, lens).last_hidden_state

        ids, mask = self.check_batch
        hidden = np.asarray(forward(*dense(ids, mask)))
        name = f"ctranslate2 {'fp32' if compute_type == 'float32' else compute_type}"
        check_agreement(name, hidden, self.reference, mask)
        inputs = [dense(ids, mask) for ids, mask in self.batches]

        def run() -> None:
            for ids, lengths in inputs:
                forward(ids, lengths)

        return run
