"""Synthetic clinical notes and a small random BERT, made offline.

They drive the demo job, the tests and the benchmarks: nothing is downloaded. The notes look
like MIMIC discharge summaries (sections, abbreviations, `[**...**]` de-identification spans,
vitals, medication lists) but are random; the model has random weights in the HF BERT layout
(a BertForPreTraining-style checkpoint: `bert.` prefix, pooler and MLM head) with a vocab that
covers the notes' words.
"""

from __future__ import annotations

import json
import random
from pathlib import Path
from typing import Any

import numpy as np

SECTIONS = [
    "Chief Complaint", "History of Present Illness", "Past Medical History", "Medications on Admission",
    "Allergies", "Physical Exam", "Pertinent Results", "Brief Hospital Course", "Discharge Medications",
    "Discharge Disposition", "Discharge Diagnosis", "Discharge Instructions", "Followup Instructions",
]  # fmt: skip
PHRASES = [
    "pt is a {age} yo {sex} with hx of {dx} who presented with {sx}",
    "pt was started on {med} for {dx}", "denies {sx}", "{sx} resolved with {med}",
    "vitals: t {temp} hr {hr} bp {sbp}/{dbp} rr {rr} o2 sat {sat}% ra",
    "{med} {dose} mg po b.i.d.", "{med} {dose} mg iv q{q}h prn {sx}",
    "cxr showed {finding}", "echo with ef {ef}% and {finding}", "transferred to the micu for {dx}",
    "seen by [**First Name8 (NamePattern2) {num}**] [**Last Name (NamePattern1) {num}**] on [**{date}**]",
    "admitted to [**Hospital {num}**] on [**{date}**]", "follow up with dr. [**Known lastname {num}**] in {q} weeks",
    "labs notable for cr {cr} wbc {wbc} hct {hct}", "continue home {med}", "holding {med} given {dx}",
]  # fmt: skip
FILL = {
    "sex": ["m", "f", "M", "F"],
    "dx": ["chf", "afib", "copd exacerbation", "pneumonia", "uti", "dka", "cad", "ckd", "sepsis", "gi bleed", "CHF", "AFib"],
    "sx": ["chest pain", "sob", "dyspnea", "fevers", "nausea", "abd pain", "doe", "cough", "SOB"],
    "med": ["lasix", "metoprolol", "heparin", "coumadin", "vancomycin", "zosyn", "insulin", "lisinopril", "aspirin", "Lasix"],
    "finding": ["bilateral effusions", "rll infiltrate", "no acute process", "lvh", "mild mr", "pulmonary edema"],
}  # fmt: skip


def _fill(rng: random.Random, template: str) -> str:
    nums = {
        "age": rng.randint(18, 99), "temp": round(rng.uniform(96.5, 102.5), 1), "hr": rng.randint(50, 130),
        "sbp": rng.randint(85, 180), "dbp": rng.randint(40, 100), "rr": rng.randint(12, 30),
        "sat": rng.randint(85, 100), "dose": rng.choice([5, 10, 20, 25, 40, 81, 100, 500]),
        "q": rng.choice([4, 6, 8, 12]), "ef": rng.randint(15, 70), "num": rng.randint(1, 9999),
        "date": f"21{rng.randint(10, 99)}-{rng.randint(1, 12)}-{rng.randint(1, 28)}",
        "cr": round(rng.uniform(0.5, 4.0), 1), "wbc": round(rng.uniform(3, 25), 1), "hct": rng.randint(20, 45),
    }  # fmt: skip
    words = {k: rng.choice(v) for k, v in FILL.items()}
    return template.format(**nums, **words)


def make_note(rng: random.Random, target_words: int) -> str:
    lines, count = [], 0
    while count < target_words:
        section = rng.choice(SECTIONS)
        body = ". ".join(_fill(rng, rng.choice(PHRASES)) for _ in range(rng.randint(1, 6)))
        lines.append(f"{section}:\n{body}.\n")
        count += len(body.split()) + 2
    return "\n".join(lines)


def make_notes(n: int, seed: int = 0, min_words: int = 10, max_words: int = 600) -> list[str]:
    """`n` notes with word counts spread log-uniformly over [min_words, max_words]."""
    rng = random.Random(seed)
    lo, hi = np.log(min_words), np.log(max_words)
    return [make_note(rng, int(np.exp(rng.uniform(lo, hi)))) for _ in range(n)]


def write_corpus(path: str | Path, n: int, seed: int = 0, max_words: int = 600) -> Path:
    """A Parquet corpus: note_id (int64), subject_id, category, text."""
    import pyarrow as pa
    import pyarrow.parquet as pq

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    notes = make_notes(n, seed, max_words=max_words)
    rng = random.Random(seed + 1)
    table = pa.table(
        {
            "note_id": pa.array(range(1, n + 1), pa.int64()),
            "subject_id": pa.array([rng.randint(10000, 99999) for _ in range(n)], pa.int64()),
            "category": pa.array(["Discharge summary"] * n),
            "text": pa.array(notes),
        }
    )
    pq.write_table(table, path, row_group_size=max(1, n // 8))
    return path


def vocab_for(notes: list[str] | None = None) -> list[str]:
    """A WordPiece vocab: specials, characters (+ ## forms) and the words of the notes."""
    chars = [chr(c) for c in range(33, 127)]
    words: set[str] = set()
    for note in notes or make_notes(200, seed=1234):
        for w in note.replace(".", " ").replace(":", " ").split():
            if w.isalpha():
                words.update((w, w.lower()))
    specials = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
    return list(dict.fromkeys(specials + chars + [f"##{c}" for c in chars] + sorted(words)))


def make_model(
    out_dir: str | Path,
    hidden: int = 128,
    layers: int = 2,
    heads: int = 4,
    intermediate: int | None = None,
    max_positions: int = 512,
    seed: int = 0,
) -> Path:
    """Write a random BERT checkpoint (config.json, model.safetensors, vocab.txt)."""
    import torch
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    vocab = vocab_for()
    (out / "vocab.txt").write_text("\n".join(vocab) + "\n")
    inter = intermediate or 4 * hidden
    config = {
        "architectures": ["BertForPreTraining"], "model_type": "bert", "vocab_size": len(vocab),
        "hidden_size": hidden, "num_hidden_layers": layers, "num_attention_heads": heads,
        "intermediate_size": inter, "hidden_act": "gelu", "max_position_embeddings": max_positions,
        "type_vocab_size": 2, "layer_norm_eps": 1e-12, "pad_token_id": 0,
    }  # fmt: skip
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    g = torch.Generator().manual_seed(seed)
    rand = lambda *shape: torch.randn(*shape, generator=g) * 0.02  # noqa: E731
    ones, zeros = torch.ones, torch.zeros
    v, c = len(vocab), hidden
    state = {
        "bert.embeddings.word_embeddings.weight": rand(v, c),
        "bert.embeddings.position_embeddings.weight": rand(max_positions, c),
        "bert.embeddings.token_type_embeddings.weight": rand(2, c),
        "bert.embeddings.LayerNorm.weight": ones(c),
        "bert.embeddings.LayerNorm.bias": zeros(c),
        "bert.pooler.dense.weight": rand(c, c),
        "bert.pooler.dense.bias": zeros(c),
        "cls.predictions.transform.dense.weight": rand(c, c),
        "cls.predictions.transform.dense.bias": zeros(c),
        "cls.predictions.transform.LayerNorm.weight": ones(c),
        "cls.predictions.transform.LayerNorm.bias": zeros(c),
        "cls.predictions.bias": zeros(v),
    }
    for i in range(layers):
        p = f"bert.encoder.layer.{i}."
        for name in ("attention.self.query", "attention.self.key", "attention.self.value",
                     "attention.output.dense"):  # fmt: skip
            state[p + name + ".weight"], state[p + name + ".bias"] = rand(c, c), zeros(c)
        state[p + "intermediate.dense.weight"], state[p + "intermediate.dense.bias"] = (
            rand(inter, c),
            zeros(inter),
        )
        state[p + "output.dense.weight"], state[p + "output.dense.bias"] = rand(c, inter), zeros(c)
        for name in ("attention.output.LayerNorm", "output.LayerNorm"):
            state[p + name + ".weight"], state[p + name + ".bias"] = ones(c), zeros(c)
    save_file(state, out / "model.safetensors", metadata={"format": "pt"})
    return out


BPE_SPECIALS = ("[UNK]", "[CLS]", "[SEP]", "[PAD]", "[MASK]")


def make_bpe_tokenizer(vocab_size: int = 600, notes: list[str] | None = None) -> Any:
    """A byte-level BPE `tokenizers.Tokenizer` trained on synthetic notes, framed like
    ModernBERT's ([CLS] $A [SEP] by its post-processor), [MASK] an added special token."""
    from tokenizers import Tokenizer, decoders, pre_tokenizers, processors, trainers
    from tokenizers.models import BPE

    tok = Tokenizer(BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size, special_tokens=list(BPE_SPECIALS), show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )  # fmt: skip
    tok.train_from_iterator(notes or make_notes(200, seed=1234), trainer)
    cls, sep = tok.token_to_id("[CLS]"), tok.token_to_id("[SEP]")
    tok.post_processor = processors.TemplateProcessing(
        single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B [SEP]",
        special_tokens=[("[CLS]", cls), ("[SEP]", sep)],
    )  # fmt: skip
    return tok


def make_modernbert(
    out_dir: str | Path,
    hidden: int = 64,
    layers: int = 4,
    heads: int = 4,
    intermediate: int | None = None,
    local_attention: int = 16,
    global_every: int = 3,
    max_positions: int = 8192,
    seed: int = 0,
) -> Path:
    """Write a random ModernBERT masked-LM checkpoint (config.json in the hub repos' layout,
    model.safetensors with `model.` keys and an MLM head, a BPE tokenizer.json)."""
    import torch
    from safetensors.torch import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    tok = make_bpe_tokenizer()
    tok.save(str(out / "tokenizer.json"))
    v, c, inter = tok.get_vocab_size(), hidden, intermediate or 2 * hidden
    config = {
        "architectures": ["ModernBertForMaskedLM"], "model_type": "modernbert",
        "vocab_size": v, "hidden_size": c, "num_hidden_layers": layers,
        "num_attention_heads": heads, "intermediate_size": inter, "hidden_activation": "gelu",
        "max_position_embeddings": max_positions, "norm_eps": 1e-5, "norm_bias": False,
        "global_attn_every_n_layers": global_every, "local_attention": local_attention,
        "global_rope_theta": 160000.0, "local_rope_theta": 10000.0,
        "pad_token_id": tok.token_to_id("[PAD]"), "cls_token_id": tok.token_to_id("[CLS]"),
        "sep_token_id": tok.token_to_id("[SEP]"), "classifier_activation": "gelu",
        "decoder_bias": True, "tie_word_embeddings": True,
    }  # fmt: skip
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    g = torch.Generator().manual_seed(seed)
    rand = lambda *shape: torch.randn(*shape, generator=g) * 0.05  # noqa: E731
    state = {
        "model.embeddings.tok_embeddings.weight": rand(v, c),
        "model.embeddings.norm.weight": torch.ones(c),
        "model.final_norm.weight": torch.ones(c),
        "head.dense.weight": rand(c, c),
        "head.norm.weight": torch.ones(c),
        "decoder.bias": torch.zeros(v),
    }
    for i in range(layers):
        p = f"model.layers.{i}."
        if i:
            state[p + "attn_norm.weight"] = torch.ones(c)
        state[p + "attn.Wqkv.weight"] = rand(3 * c, c)
        state[p + "attn.Wo.weight"] = rand(c, c)
        state[p + "mlp_norm.weight"] = torch.ones(c)
        state[p + "mlp.Wi.weight"] = rand(2 * inter, c)
        state[p + "mlp.Wo.weight"] = rand(c, inter)
    save_file(state, out / "model.safetensors", metadata={"format": "pt"})
    return out


DEID_LABELS = ("O", "B-NAME", "I-NAME", "B-DATE", "I-DATE", "B-HOSPITAL", "I-HOSPITAL")


def make_task_model(base: str | Path, out_dir: str | Path, task: str, seed: int = 0) -> Path:
    """A fine-tuned-style checkpoint from `make_model`'s `base`, with a random classifier.

    `readmission`: a one-logit BertForSequenceClassification in the layout of Huang et al.'s
    archive (bert_config.json without model_type or labels, pytorch_model.bin, LayerNorm
    `gamma`/`beta`). `deid`: a BertForTokenClassification (config.json with DEID_LABELS,
    model.safetensors) whose classifier leans to `O`, so entities are a minority of tokens."""
    import torch
    from safetensors.torch import load_file, save_file

    src, out = Path(base), Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / "vocab.txt").write_bytes((src / "vocab.txt").read_bytes())
    config = json.loads((src / "config.json").read_text())
    state = {k: v for k, v in load_file(src / "model.safetensors").items()
             if k.startswith("bert.")}  # fmt: skip
    g = torch.Generator().manual_seed(seed)
    c, labels = config["hidden_size"], DEID_LABELS if task == "deid" else ("LABEL_0",)
    state["classifier.weight"] = torch.randn(len(labels), c, generator=g) * 0.5
    state["classifier.bias"] = torch.zeros(len(labels))
    if task == "readmission":
        del config["model_type"], config["architectures"]
        (out / "bert_config.json").write_text(json.dumps(config, indent=2) + "\n")
        legacy = {k.replace("LayerNorm.weight", "LayerNorm.gamma")
                  .replace("LayerNorm.bias", "LayerNorm.beta"): v for k, v in state.items()}  # fmt: skip
        torch.save(legacy, out / "pytorch_model.bin")
        return out
    if task != "deid":
        raise ValueError(f"task must be readmission or deid, got {task!r}")
    state = {k: v for k, v in state.items() if not k.startswith("bert.pooler.")}
    state["classifier.bias"][0] = 4.0  # most tokens `O`
    config |= {"architectures": ["BertForTokenClassification"],
               "id2label": dict(enumerate(labels)),
               "label2id": {name: i for i, name in enumerate(labels)}}  # fmt: skip
    (out / "config.json").write_text(json.dumps(config, indent=2) + "\n")
    save_file(state, out / "model.safetensors", metadata={"format": "pt"})
    return out
