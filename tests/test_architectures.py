"""The house of clinicalbert_core: every architecture module meets the written contract, the
shared mechanics branch on no model_type, and importing the package is cheap and changes
nothing (a runner bounds oneDNN's caches when it is created)."""

from __future__ import annotations

import inspect
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from torch import nn

from clinicalbert_core import architectures, bert, modernbert
from clinicalbert_core.architectures import ARCHITECTURES, CONTRACT
from clinicalbert_core.config import EncoderConfig

CORE = Path(architectures.__file__).parent
ONEDNN_ENV = ("ONEDNN_PRIMITIVE_CACHE_CAPACITY", "LRU_CACHE_CAPACITY")
KINDS = {
    "class": inspect.isclass,
    "class | None": lambda v: v is None or inspect.isclass(v),
    "function": inspect.isfunction,
    "str": lambda v: isinstance(v, str),
    "str | None": lambda v: v is None or isinstance(v, str),
    "tuple": lambda v: isinstance(v, tuple),
    "dict": lambda v: isinstance(v, dict),
    "pattern": lambda v: isinstance(v, re.Pattern),
}


def test_contract_is_written_down():
    names = [name for name, _, _ in CONTRACT]
    assert len(names) == len(set(names))
    for name, kind, what in CONTRACT:
        assert kind in KINDS and what, name
    assert architectures.__doc__ and "CONTRACT" in architectures.__doc__


@pytest.mark.parametrize("model_type", sorted(ARCHITECTURES))
def test_every_architecture_provides_the_contract(model_type):
    module = ARCHITECTURES[model_type]
    missing = [name for name, _, _ in CONTRACT if not hasattr(module, name)]
    assert not missing, f"{module.__name__} lacks {missing}"
    wrong = [(name, kind) for name, kind, _ in CONTRACT if not KINDS[kind](getattr(module, name))]
    assert not wrong, f"{module.__name__}: not of the kind the contract says: {wrong}"
    assert issubclass(module.Config, EncoderConfig)
    assert issubclass(module.Encoder, nn.Module)
    assert module.Pooler is None or issubclass(module.Pooler, nn.Module)
    assert {"embed.word.weight", "mlm.decoder.weight"} <= set(module.RENAMES.values())


def test_architecture_fields_for_inspect():
    """What `inspect` shows beyond the shape, and what the CLI prints of it."""
    mb = modernbert.Config.from_dict(
        {"vocab_size": 64, "num_hidden_layers": 4, "global_attn_every_n_layers": 3}
    )
    fields = modernbert.inspect_fields(mb)
    assert fields == {"local_window": 128, "global_every": 3,
                      "rope_theta": {"global": 160000.0, "local": 10000.0}}  # fmt: skip
    info = {**fields, "config": mb.to_dict()}
    assert modernbert.inspect_lines(info) == [
        ("attention", "local window 128 (|i-j| <= 64), global every 3"),
        ("rope theta", "global 160000, local 10000"),
    ]
    uneven = {**info, "global_every": None}
    assert modernbert.inspect_lines(uneven)[0][1].endswith(
        "global every layer in ['full_attention', 'sliding_attention', 'sliding_attention', "
        "'full_attention']"
    )
    b = bert.Config.from_dict({"vocab_size": 64})
    assert bert.inspect_fields(b) == {} and bert.inspect_lines({}) == []
    assert bert.special_ids(b) == {"cls": None, "sep": None}
    assert modernbert.special_ids(mb) == {"cls": None, "sep": None}
    named = modernbert.Config.from_dict({"vocab_size": 64, "cls_token_id": 1, "sep_token_id": 2})
    assert modernbert.special_ids(named) == {"cls": 1, "sep": 2}


@pytest.mark.parametrize("name", ["hub.py", "weights.py", "tokenizer.py", "runner.py"])
def test_shared_mechanics_branch_on_no_architecture(name):
    """Per-architecture code lives in the architecture modules, behind CONTRACT's names."""
    code = "\n".join(
        line.split("#")[0] for line in (CORE / name).read_text().splitlines()
    )  # comments aside
    for pattern in (r'"modernbert"', r'"bert"', r"model_type ==", r"architecture ==",
                    r"modernbert\.", r"\bbert\."):  # fmt: skip
        hits = [m.group(0) for m in re.finditer(pattern, code)]
        assert not hits, f"{name}: {pattern}"


def test_import_is_cheap_and_changes_nothing():
    """`import clinicalbert_core` (and its torch-free modules) loads no torch and sets no
    environment variable; the public names still import, each on first use."""
    code = (
        "import os, sys\n"
        "env = dict(os.environ)\n"
        "import clinicalbert_core, clinicalbert_core.variants, clinicalbert_core.limits\n"
        "print(sorted({'torch', 'tokenizers', 'huggingface_hub'} & set(sys.modules)))\n"
        "print(dict(os.environ) == env)\n"
        "from clinicalbert_core import ClinicalBertRunner, inspect, __all__\n"
        "print(all(hasattr(clinicalbert_core, n) for n in __all__))\n"
        "print(os.environ.get('ONEDNN_PRIMITIVE_CACHE_CAPACITY'))\n"
    )
    clean = {k: v for k, v in os.environ.items() if k not in ONEDNN_ENV}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=clean, check=True)  # fmt: skip
    assert done.stdout.split("\n")[:4] == ["[]", "True", "True", "None"], done.stdout


def test_a_runner_bounds_onednn_caches(model_dir):
    """Creating a runner bounds oneDNN's caches (ops.ONEDNN_CACHE_ENV); a value the
    environment sets wins (job actors start with theirs)."""
    code = (
        "import os, sys\n"
        "from clinicalbert_core import ClinicalBertRunner\n"
        f"r = ClinicalBertRunner.load({str(model_dir)!r}, precision='fp32', max_seq=128)\n"
        "print(os.environ.get('ONEDNN_PRIMITIVE_CACHE_CAPACITY'), os.environ['LRU_CACHE_CAPACITY'])\n"
    )
    clean = {k: v for k, v in os.environ.items() if k not in ONEDNN_ENV}
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=clean, check=True)  # fmt: skip
    assert done.stdout.split() == ["16", "16"], done.stdout
    kept = {**clean, "ONEDNN_PRIMITIVE_CACHE_CAPACITY": "0", "LRU_CACHE_CAPACITY": "1"}  # actors'
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=kept, check=True)  # fmt: skip
    assert done.stdout.split() == ["0", "1"], done.stdout
