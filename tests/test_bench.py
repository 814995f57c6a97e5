"""`clinicalbert bench`: the one-line message for a missing bench extra, the timing and batching
helpers, each peer engine (onnxruntime, CTranslate2; fp32 and int8) agreeing with
transformers on a tiny BERT before it may be timed, the `python -m jobs.bench` entry point the
benches re-run themselves through, and that no product module imports the bench."""

from __future__ import annotations

import ast
import json
import re
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch

import jobs
from clinicalbert_core.quant import int8_supported
from jobs import bench, cli
from jobs.bench import encoder, meter, peers, probes, workload


@pytest.mark.parametrize("module", ["onnxruntime", "ctranslate2", "onnx"])
def test_missing_peer_package_is_one_line(module, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, module, None)  # `import module` now raises ImportError
    assert cli.main(["bench", "--peers", "--notes", "2"]) == 2
    out, err = capsys.readouterr()
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert module in lines[0] and "pip install 'clinicalbert-jobs[bench]'" in lines[0]
    assert out == ""


def test_missing_transformers_is_one_line(monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "transformers", None)
    assert bench.main(["--notes", "2"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "transformers" in err[0] and "clinicalbert-jobs[bench]" in err[0]


@pytest.mark.parametrize(
    ("args", "says"),
    [
        (["--notes", "0"], "argument --notes: must be at least 1, got 0"),
        (["--repeats", "0"], "argument --repeats: must be at least 1, got 0"),
        (["--hf-batch", "x"], "argument --hf-batch: not an integer: 'x'"),
        (["--min-len", "600"], "--min-len 600 is above --max-len 512"),
        (["--max-len", "600"], "--max-len 600 is above BERT's 512 positions"),
        (["--device", "gpu"], "argument --device: device must be cpu, cuda, cuda:<index> or mps"),
        (["--job", "--job-hidden", "30"], "--job-hidden must be a multiple of 4"),
        (["--long-note-memory", "--threads", "0"], "argument --threads: must be at least 1"),
        (["--long-note-memory", "--long", "9", "--notes", "4"], "--long 9 is more than --notes 4"),
    ],
)
def test_bad_bench_arguments_are_usage_errors(args, says, capsys):
    with pytest.raises(SystemExit) as stop:
        bench.main(args)
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert says in err and "Traceback" not in err, err


def test_dispatch_bench_prints_the_drivers_cost_per_shard(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "transformers", None)  # the job layer's own: not needed
    out = tmp_path / "dispatch.json"
    args = ["--dispatch", "--dispatch-actors", "40", "--dispatch-shards", "2000"]
    assert bench.main([*args, "--json", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "2,000 shards over 40 fake actors" in printed and "us per shard" in printed
    figures = json.loads(out.read_text())
    assert figures["actors"] == 40 and figures["shards"] == 2000
    assert figures["dispatch_us_per_shard"] > 0 and figures["monitor_questions_per_round"] == 40
    assert figures["wait_calls_per_shard"] < 1  # results collected in bursts


def test_bench_on_a_device_torch_does_not_see_says_so(capsys):
    if torch.cuda.is_available():
        pytest.skip("this machine has a CUDA device")
    with pytest.raises(SystemExit):
        bench.main(["--device", "cuda"])
    assert "torch sees no CUDA (or ROCm) device" in capsys.readouterr().err


def test_padded_batches_sorted_and_padded():
    seqs = [np.arange(n) + 1 for n in (3, 5, 2, 4)]
    batches = workload.padded_batches(seqs, 3, sort=True)
    assert [ids.shape for ids, _ in batches] == [(3, 5), (1, 2)]
    ids, mask = batches[0]
    assert mask.sum(axis=1).tolist() == [5, 4, 3]
    assert ids[2].tolist() == [1, 2, 3, 0, 0] and ids.dtype == np.int64
    unsorted = workload.padded_batches(seqs, 3, sort=False)
    assert unsorted[0][1].sum(axis=1).tolist() == [3, 5, 2]


def test_timed_rounds_interleaves():
    calls = []
    runs = {name: (lambda name=name: calls.append(name)) for name in "abc"}
    best = meter.timed_rounds(runs, torch.device("cpu"), repeats=2)
    assert calls == list("abc") * 3  # warm-up round, then two timed rounds in turn
    assert set(best) == set("abc") and all(t >= 0 for t in best.values())


def test_gemm_peak_names_its_kernel():
    cpu = torch.device("cpu")
    rate, kernel = probes.gemm_peak(cpu, "fp32", seconds=0.01)
    assert rate > 0 and kernel in ("torch.matmul", "onednn linear")
    if int8_supported():
        rate, kernel = probes.gemm_peak(cpu, "int8", seconds=0.01)
        assert rate > 0 and kernel in ("torch._int_mm", "onednn qlinear")


def test_int8_bound_counts_attention_at_fp32():
    peaks = {"fp32": 100.0, "int8": 400.0}
    # 400 linear ops at 400/s + 100 attention ops at 100/s = 2 s allowed, 4 s taken
    assert probes.bound_fraction("int8", 400.0, 100.0, peaks, 4.0) == pytest.approx(0.5)
    assert probes.bound_fraction("fp32", 400.0, 100.0, peaks, 10.0) == pytest.approx(0.5)
    assert probes.bound_fraction("bf16", 400.0, 100.0, peaks, 1.0) == 0.0  # not probed


def test_target_figures():
    rows = {
        "ours fp32": {"precision": "fp32", "tok_s": 300.0, "of_bound": 0.7},
        "ours int8": {"precision": "int8", "tok_s": 600.0, "of_bound": 0.2},
        "transformers fp32 sorted": {"precision": "fp32", "tok_s": 200.0, "of_bound": 0.5},
        "onnxruntime fp32": {"precision": "fp32", "tok_s": 250.0, "of_bound": 0.6},
        "onnxruntime int8": {"precision": "int8", "tok_s": 400.0, "of_bound": 0.1},
    }
    t = encoder.target_figures(rows)
    best_int8 = {"ratio": 1.5, "sides": ["ours int8", "onnxruntime int8"]}
    assert t["ours int8 / best int8 peer"] == best_int8
    assert t["ours fp32 / best fp32 peer"]["sides"] == ["ours fp32", "onnxruntime fp32"]
    assert t["ours best / best peer"] == best_int8
    assert t["ours int8 / ours fp32"]["ratio"] == 2.0
    assert t["ours fp32 of the fp32 GEMM bound"] == {"fraction": 0.7}


def test_check_agreement_rejects_a_wrong_output():
    rng = np.random.default_rng(0)
    ref = rng.standard_normal((2, 6, 8)).astype(np.float32)
    mask = np.array([[1] * 6, [1] * 3 + [0] * 3])
    noisy_padding = ref.copy()
    noisy_padding[1, 3:] = 1e3  # padded slots are not compared
    peers.check_agreement("same", noisy_padding, ref, mask)
    wrong = ref.copy()
    wrong[1, 1] = -wrong[1, 1]
    with pytest.raises(RuntimeError, match="wrong disagrees with transformers fp32"):
        peers.check_agreement("wrong", wrong, ref, mask)


@pytest.fixture(scope="module")
def tiny_peers():
    """The peer sides over a 2-layer, hidden-32 BERT and batches of 3 mixed-length sequences."""
    pytest.importorskip("transformers")
    from transformers import BertConfig, BertModel

    config = BertConfig(vocab_size=1000, hidden_size=32, num_hidden_layers=2,
                        num_attention_heads=4, intermediate_size=64, max_position_embeddings=64)  # fmt: skip
    config._attn_implementation = "sdpa"

    def make_hf() -> BertModel:
        torch.manual_seed(0)
        return BertModel(config, add_pooling_layer=False).eval()

    rng = np.random.default_rng(0)
    seqs = [rng.integers(5, 1000, n) for n in (40, 7, 23, 3, 31, 12, 18)]
    return make_hf, workload.padded_batches(seqs, 3, sort=True)


@pytest.mark.parametrize(
    "side, module",
    [("onnxruntime fp32", "onnxruntime"), ("onnxruntime int8", "onnxruntime"),
     ("ctranslate2 fp32", "ctranslate2"), ("ctranslate2 int8", "ctranslate2")],
)  # fmt: skip
def test_peer_agrees_with_transformers(side, module, tiny_peers):
    pytest.importorskip(module)
    if module == "onnxruntime":
        pytest.importorskip("onnx")
    make_hf, batches = tiny_peers
    table = peers.sides(make_hf, batches, threads=1)
    precision, factory = table[side]
    assert precision == side.split()[1]
    run = factory()  # raises unless it agrees with transformers fp32 (cosine >= 0.99)
    run()


def test_python_m_jobs_bench_is_the_command():
    """The benches measure sides in fresh `python -m jobs.bench` processes (--memory-of,
    --long-note-memory --side): that entry point takes the command's options."""
    cmd = [sys.executable, "-m", "jobs.bench", "--long-note-memory", "--help"]
    done = subprocess.run(cmd, capture_output=True, text=True, check=True)
    assert "usage: clinicalbert bench --long-note-memory" in done.stdout


def test_no_product_module_imports_the_bench():
    """Benchmarks sit beside the product: only jobs/cli.py imports jobs.bench."""
    root = Path(jobs.__file__).parent
    for path in root.rglob("*.py"):
        parts = path.relative_to(root).parts
        if parts[0] == "bench" or parts == ("cli.py",):
            continue
        for node in ast.walk(ast.parse(path.read_text())):
            if isinstance(node, ast.ImportFrom):
                names = (node.module or "").split(".") + [a.name for a in node.names]
            elif isinstance(node, ast.Import):
                names = [part for a in node.names for part in a.name.split(".")]
            else:
                continue
            assert "bench" not in names, f"{path} imports the bench (line {node.lineno})"


def test_heads_bench_prints_each_sides_ratio_to_vectors_only(tmp_path, monkeypatch, capsys,
                                                             ray_local):  # fmt: skip
    """A tiny `--heads` run: the runner loop, the actor's code and the full job (the session's
    local Ray) of every side, ratios to vectors only against their targets, the token path's parts."""
    monkeypatch.setitem(sys.modules, "transformers", None)  # the job layer's own: not needed
    out, threads = tmp_path / "heads.json", torch.get_num_threads()
    args = ["--heads", "--heads-notes", "6", "--heads-rounds", "1", "--job-hidden", "32",
            "--job-layers", "1", "--json", str(out)]  # fmt: skip
    assert bench.main(args) == 0
    printed = capsys.readouterr().out
    figures = json.loads(out.read_text())
    assert figures["notes"] == 6 and figures["tokens"] > figures["windows"] > 6  # long notes
    assert ray_local.is_initialized()  # the session's Ray, used and left running
    assert torch.get_num_threads() == threads  # the runner loop's one thread, given back
    sides = ["vectors", "classify", "tokens", "tokens+redact"]
    targets = [None, 0.97, 0.90, 0.90]
    views = ("runner_loop", "runner_loop_cpu", "actor_code", "actor_code_cpu", "job",
             "job_actors_busy")  # fmt: skip
    for view in views:
        rows = figures[view]
        assert list(rows) == sides
        assert rows["vectors"]["ratio_best"] == rows["vectors"]["ratio_median"] == 1.0
        assert [rows[s]["target"] for s in sides] == targets
        for s in sides:
            assert len(rows[s]["seconds"]) == 1 and rows[s]["notes_s_best"] > 0
            assert rows[s]["ratio_best"] > 0 and rows[s]["met"] == (
                None if s == "vectors" else rows[s]["ratio_best"] >= rows[s]["target"])  # fmt: skip
    parts = figures["token_parts_s"]
    assert {"stitch", "Subwords.flags", "group", "redact_notes", "encode_windows"} <= set(parts)
    assert all(seconds > 0 for seconds in parts.values())
    assert "task heads vs vectors only on" in printed and "full job (" in printed
    for s, target in zip(sides[1:], targets[1:]):
        assert re.search(rf"\n    {re.escape(s)} +[\d.]+ / +[\d.]+  [\d.]+ / [\d.]+  target >= "
                         rf"{target:.2f}: (met|NOT MET)\n", printed), s  # fmt: skip
    assert re.search(r"\n    Subwords\.flags +[\d.]+ ms +[\d.]+%\n", printed)
