"""Feeding the encoder: units tokenized ahead (bounded), tokenizer threads, the device feed.

On CPU the cuda actor's host side (several units ahead, tokenizer threads, small units) is
forced through `Feed`; pinned copies on a side stream are checked only where CUDA is.
"""

from __future__ import annotations

import threading
import time
from pathlib import Path

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import pytest
import torch

from clinicalbert_core.hub import ModelBundle
from clinicalbert_core.packing import DeviceFeed, pack_flat, token_budget_batches
from clinicalbert_core.tokenizer import NoteTokenizer, wordpiece_from_vocab
from jobs.actor import Feed, ShardProcessor, prefetch
from jobs.corpus import plan_shards
from jobs.feed import GPU_DEPTH, UNIT_BATCHES
from jobs.launch import GPU_CPUS, actor_cpus, actor_env
from jobs.spec import PoolSpec, parse_spec
from jobs.synthetic import make_bpe_tokenizer, make_notes, vocab_for

WINDOW_FIELDS = ("ids", "token_char", "token_end", "bounds", "note", "window_index", "char_start",
                 "char_end", "note_tokens", "truncated")  # fmt: skip


# ---- prefetch: order, bound, errors, early stop ----------------------------------------------
@pytest.mark.parametrize("depth", [0, 1, 3])
def test_prefetch_keeps_order_and_runs_at_most_depth_ahead(depth: int):
    lock = threading.Lock()
    made = done = most = 0

    def items():
        nonlocal made, most
        for i in range(10):
            with lock:
                made += 1  # item i is being made
                most = max(most, made - done)
            yield i

    out = []
    for item in prefetch(items(), depth):
        time.sleep(0.01)  # a slow consumer: the producer runs as far ahead as it may
        out.append(item)
        with lock:
            done += 1
    assert out == list(range(10))
    assert most == depth + 1  # the item in use and `depth` ahead, never more


def test_prefetch_raises_the_producers_error_and_stops_when_closed():
    def broken():
        yield 1
        raise ValueError("item 2 is bad")

    with pytest.raises(ValueError, match="item 2 is bad"):
        list(prefetch(broken(), 2))

    made = []

    def endless():
        while True:
            made.append(len(made))
            yield made[-1]

    items = prefetch(endless(), 2)
    assert next(items) == 0
    items.close()  # stops and joins the producer
    count = len(made)
    time.sleep(0.05)
    assert len(made) == count <= 1 + 2 + 1  # in use, 2 ahead, at most one more begun


# ---- tokenizer threads ----------------------------------------------------------------------
def test_tokenizer_threads_and_parallelism_give_the_same_windows(tmp_path, monkeypatch):
    (tmp_path / "vocab.txt").write_text("\n".join(vocab_for()) + "\n")
    wordpiece = wordpiece_from_vocab(tmp_path / "vocab.txt", lowercase=False)
    long = "  ".join(make_notes(20, seed=9, max_words=300))  # many pieces at chunk_chars 500
    notes = [*make_notes(30, seed=2, max_words=300), long, "", "\u200b\u200b", "x"]
    for tok in (wordpiece, make_bpe_tokenizer()):
        monkeypatch.setenv("TOKENIZERS_PARALLELISM", "false")
        one = NoteTokenizer(tok, max_seq=64, policy="windows", stride=8, threads=1)
        ref = one(notes)
        monkeypatch.setenv("TOKENIZERS_PARALLELISM", "true")  # read by `tokenizers` per call
        for threads in (2, 4):
            many = NoteTokenizer(tok, max_seq=64, policy="windows", stride=8, threads=threads)
            many.chunk_chars = 500
            got = many(notes)
            for field in WINDOW_FIELDS:
                np.testing.assert_array_equal(getattr(got, field), getattr(ref, field), field)
        kept, nonempty = one.nonempty(notes)  # "" (and for WordPiece zero-width spaces)
        assert kept.tolist() == np.flatnonzero(ref.note_tokens).tolist() and 31 not in kept
        for field in ("ids", "note_tokens", "char_start"):
            np.testing.assert_array_equal(
                getattr(nonempty, field), getattr(one([notes[i] for i in kept]), field), field
            )


# ---- the actor: a cuda-style feed on CPU writes the same part --------------------------------
def _spec(tmp: Path, corpus: Path, model_dir: Path, out: str) -> object:
    return parse_spec(
        {
            "name": "feed",
            "corpus": {"format": "parquet", "paths": [str(corpus)], "id_column": "note_id"},
            "model": {"variant": "custom", "path": str(model_dir), "max_seq": 64,
                      "long_notes": {"strategy": "windows", "stride": 16, "aggregate": "mean"}},
            "heads": {"pooling": "cls"},
            "device_pool": [{"name": "cpu", "device": "cpu", "precision": "fp32",
                             "batch_tokens": 512}],
            "output": {"path": str(tmp / out)},
            "run": {"batch_rows": 16},
        },
        tmp,
    )  # fmt: skip


def test_units_ahead_on_threads_write_what_one_thread_writes(tmp_path, model_dir, monkeypatch):
    texts = make_notes(40, seed=4, max_words=200)
    texts[3] = " ".join(make_notes(12, seed=5, max_words=300))  # longer than a unit: alone
    texts[7], texts[20] = "", "\u200b\u200b"  # error rows: empty, and empty once tokenized
    texts[21] = None
    table = pa.table({"note_id": pa.array(range(len(texts)), pa.int64()), "text": texts})
    pq.write_table(table, tmp_path / "notes.parquet")
    bundle = ModelBundle.load(model_dir)
    out = {}
    for name, feed, parallel in (
        ("plain", Feed(), "false"),
        ("gpu", Feed(depth=3, threads=2, unit_chars=700), "true"),
    ):
        monkeypatch.setenv("TOKENIZERS_PARALLELISM", parallel)
        spec = _spec(tmp_path, tmp_path / "notes.parquet", model_dir, name)
        (shard,) = plan_shards(spec.corpus, str(tmp_path / "staging"), spec.run.shard_rows)
        result = ShardProcessor(bundle, spec, spec.device_pool[0], feed=feed).process(shard)
        part = tmp_path / name / f"part-{shard.id}.parquet"
        errors = pq.read_table(tmp_path / name / "_errors" / f"part-{shard.id}.parquet")
        out[name] = result, pq.read_table(part), errors, pq.ParquetFile(part).num_row_groups
    (r1, t1, e1, g1), (r2, t2, e2, g2) = out["plain"], out["gpu"]
    assert g1 == g2 == 3  # one row group per record batch of 16 rows, whatever the units
    assert e1.equals(e2) and sorted(e1["reason"].to_pylist()) == ["empty", "empty", "null"]
    assert t1.drop_columns(["embedding"]).equals(t2.drop_columns(["embedding"]))
    np.testing.assert_allclose(
        np.stack(t1["embedding"].to_numpy(zero_copy_only=False)),
        np.stack(t2["embedding"].to_numpy(zero_copy_only=False)),
        atol=1e-5,
    )  # other units batch the windows differently: the same vectors to fp32 rounding
    assert (r1.rows_out, r1.tokens, r1.windows, r1.batches) == (
        r2.rows_out, r2.tokens, r2.windows, r2.batches,
    )  # fmt: skip


def test_non_finite_outputs_become_error_rows_and_never_reach_the_part(tmp_path, model_dir):
    """NaN from the model (a poisoned embedding row: NaN stays inside its own sequence of the
    packed batch) and inf from the cast to float16: those notes, and only those, are error
    rows `non_finite`; their windows and MLM rows never reach the part; the counts add up."""
    texts = make_notes(24, seed=9, max_words=120)
    texts[5] = " ".join(make_notes(6, seed=10, max_words=200))  # several windows
    table = pa.table({"note_id": pa.array(range(len(texts)), pa.int64()), "text": texts})
    pq.write_table(table, tmp_path / "notes.parquet")
    bundle = ModelBundle.load(model_dir)

    def process(name: str, poison, **over):
        spec = _spec(tmp_path, tmp_path / "notes.parquet", model_dir, name)
        spec = parse_spec(spec.model_dump(mode="json") | over, tmp_path)
        (shard,) = plan_shards(spec.corpus, str(tmp_path / "staging"), spec.run.shard_rows)
        processor = ShardProcessor(bundle, spec, spec.device_pool[0])
        with torch.no_grad():
            poison(processor.runner)
        result = processor.process(shard)
        part = pq.read_table(tmp_path / name / f"part-{shard.id}.parquet")
        errors = pq.read_table(tmp_path / name / "_errors" / f"part-{shard.id}.parquet")
        assert result.rows_in == result.rows_out + result.error_rows + result.filtered_rows
        assert result.output_rows == part.num_rows and result.reasons == {
            "non_finite": errors.num_rows
        }  # fmt: skip
        assert set(errors["reason"].to_pylist()) == {"non_finite"}
        assert not set(part["id"].to_pylist()) & set(errors["id"].to_pylist())
        return processor.runner, part, errors

    def nan_rows(runner):  # the rarest token of note 5: its embedding row NaN
        notes = [set(runner.tokenize([t]).ids.tolist()) for t in texts]
        rarest = min(notes[5], key=lambda i: (sum(i in n for n in notes), i))
        poisoned.add(rarest)
        if runner.mlm_head is not None:  # untied first: a NaN logit would hit every position
            decoder = runner.mlm_head.decoder
            decoder.weight = torch.nn.Parameter(decoder.weight.clone())
        runner.encoder.embed.word.weight[rarest] = float("nan")

    poisoned: set[int] = set()
    mlm = {"heads": {"embeddings": False, "mlm": {"enabled": True, "positions": "all"}},
           "model": _spec(tmp_path, tmp_path, model_dir, "x").model_dump(mode="json")["model"]
           | {"long_notes": {"strategy": "windows", "stride": 16, "aggregate": "none"}}}  # fmt: skip
    for name, over in (("nan", {}), ("nan-mlm-windows", mlm)):
        poisoned.clear()
        runner, part, errors = process(name, nan_rows, **over)
        hit = [i for i, t in enumerate(texts) if poisoned & set(runner.tokenize([t]).ids.tolist())]
        assert 5 in hit and len(hit) < len(texts)  # note 5's finite windows go with it
        assert sorted(errors["id"].to_pylist()) == hit, name
        assert sorted(set(part["id"].to_pylist())) == sorted(set(range(len(texts))) - set(hit))
        if "embedding" in part.column_names:
            vectors = np.stack(part["embedding"].to_numpy(zero_copy_only=False))
            assert np.isfinite(vectors).all()
        else:  # MLM only: the log-probabilities alone find the NaN
            logprobs = pa.compute.list_flatten(pa.compute.list_flatten(part["mlm_top_logprobs"]))
            assert len(logprobs) and np.isfinite(logprobs.to_numpy()).all()

    def overflow_float16(runner):  # every CLS vector's first value ~1e6: finite in fp32 only
        runner.encoder.layers[-1].ffn_norm.bias[0] = 1e6

    half = {"output": {"path": str(tmp_path / "half"), "vector_dtype": "float16"}}
    _, part, errors = process("half", overflow_float16, **half)
    assert part.num_rows == 0 and sorted(errors["id"].to_pylist()) == list(range(len(texts)))


# ---- driver: CPUs and environment per pool ---------------------------------------------------
def test_actor_cpus_and_environment_follow_the_pool():
    nodes = [
        {"Alive": True, "Resources": {"CPU": 32.0, "GPU": 4.0}},
        {"Alive": True, "Resources": {"CPU": 8.0, "GPU": 4.0}},
        {"Alive": True, "Resources": {"CPU": 64.0}},
        {"Alive": False, "Resources": {"CPU": 1.0, "GPU": 8.0}},
    ]
    gpu = PoolSpec(name="gpu", device="cuda", batch_tokens=65536)
    pinned = PoolSpec(name="g", device="cuda", cpus_per_actor=6)
    cpu = PoolSpec(name="c", device="cpu")
    # 8 CPUs for 4 GPUs on the smaller GPU node; the pools' own cpus_per_actor where set
    assert actor_cpus((gpu, pinned, cpu), nodes) == {"gpu": 2, "g": 6, "c": 1}
    assert actor_cpus((gpu,), nodes[:1]) == {"gpu": GPU_CPUS}
    env = actor_env(gpu, 3)
    assert (env["TOKENIZERS_PARALLELISM"], env["RAYON_NUM_THREADS"], env["OMP_NUM_THREADS"]) == (
        "true", "3", "3",
    )  # fmt: skip
    cpu = actor_env(PoolSpec(name="c", device="cpu", cpus_per_actor=2), 2)
    assert cpu["TOKENIZERS_PARALLELISM"] == "false" and "RAYON_NUM_THREADS" not in cpu
    for e in (env, cpu):  # oneDNN's per-shape caches off (memory flat over a shard)
        assert (e["ONEDNN_PRIMITIVE_CACHE_CAPACITY"], e["LRU_CACHE_CAPACITY"]) == ("0", "1")
        assert "PYTORCH_ENABLE_MPS_FALLBACK" not in e
    assert actor_env(PoolSpec(name="m", device="mps"), 1)["PYTORCH_ENABLE_MPS_FALLBACK"] == "1"
    assert Feed.for_pool(gpu, 3) == Feed(GPU_DEPTH, 3, UNIT_BATCHES * 65536)
    assert Feed.for_pool(PoolSpec(name="c", device="cpu", cpus_per_actor=8)) == Feed(
        1, 1, UNIT_BATCHES * 8192
    )


# ---- DeviceFeed ----------------------------------------------------------------------------
def _windows(seed: int = 0, n: int = 30) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    rng = np.random.default_rng(seed)
    lengths = rng.integers(3, 40, n)
    bounds = np.concatenate(([0], np.cumsum(lengths)))
    return rng.integers(0, 1000, bounds[-1]).astype(np.int32), bounds, lengths


def _same(a, b) -> None:
    for name, t in a._tensors().items():
        torch.testing.assert_close(t.cpu(), getattr(b, name).cpu(), rtol=0, atol=0)
    assert (a.max_seqlen, a.key_mask is None) == (b.max_seqlen, b.key_mask is None)


def test_device_feed_packs_each_batch_in_order_one_ahead():
    ids, bounds, lengths = _windows()
    batches = token_budget_batches(lengths, 100)
    feed = DeviceFeed(ids, bounds, batches, torch.device("cpu"))
    seen = []
    for fed in feed:
        assert feed.made == fed.index + 1  # made when asked for: nothing prefetched yet
        feed.prefetch()
        feed.prefetch()  # once is enough
        assert feed.made == min(fed.index + 2, len(batches))
        chosen = batches[fed.index]
        flat = np.concatenate([ids[bounds[w] : bounds[w + 1]] for w in chosen]).astype(np.int64)
        np.testing.assert_array_equal(fed.ids, flat)
        _same(fed.batch, pack_flat(torch.from_numpy(flat), lengths[chosen]))
        assert (
            fed.host is fed.batch or fed.host.input_ids.data_ptr() == fed.batch.input_ids.data_ptr()
        )
        seen.append(fed.index)
    assert seen == list(range(len(batches)))


def test_runner_packs_the_next_batch_while_the_current_one_computes(model_dir, monkeypatch):
    """encode_windows runs on a DeviceFeed: batch i+1 is packed (on CUDA: copied) after batch
    i's forward is launched and before its results are read back, and the vectors and MLM rows
    are those of encoding every window alone."""
    from clinicalbert_core import ClinicalBertRunner

    r = ClinicalBertRunner.load(model_dir, max_seq=32, long_notes="windows", stride=8,
                                batch_tokens=64, mlm=True)  # fmt: skip
    windows = r.tokenize(make_notes(12, seed=5, max_words=60))
    assert len(token_budget_batches(windows.lengths, 64)) >= 4
    events: list[tuple[str, int]] = []
    real_prefetch, real_forward = DeviceFeed.prefetch, r._forward

    def spy_prefetch(feed):
        before = feed.made
        real_prefetch(feed)
        if feed.made > before:
            events.append(("packed", before))

    def spy_forward(batch):
        events.append(("forward", len(events)))
        return real_forward(batch)

    monkeypatch.setattr(DeviceFeed, "prefetch", spy_prefetch)
    monkeypatch.setattr(r, "_forward", spy_forward)
    real_cpu = torch.Tensor.cpu
    monkeypatch.setattr(
        torch.Tensor, "cpu", lambda t, *a, **k: events.append(("read", 0)) or real_cpu(t, *a, **k)
    )
    out = r.encode_windows(windows, mlm_positions="all")
    monkeypatch.undo()
    kinds = [k for k, _ in events]
    n = len(token_budget_batches(windows.lengths, 64))
    assert [i for k, i in events if k == "packed"] == list(range(n))
    forwards = [j for j, k in enumerate(kinds) if k == "forward"]
    assert len(forwards) == n
    for b, at in enumerate(forwards[:-1]):  # between forward b and the first read after it
        first_read = kinds.index("read", at)
        assert ("packed", b + 1) in events[at:first_read], (b, kinds)
    for w in range(windows.num_windows):
        alone = r.encode_windows(windows, np.array([w]), mlm_positions="all")
        np.testing.assert_allclose(out.vectors[w], alone.vectors[0], atol=1e-5)
        mine = out.mlm.window == w
        np.testing.assert_array_equal(out.mlm.top_ids[mine], alone.mlm.top_ids)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")
def test_device_feed_on_cuda_copies_pinned_batches_on_a_side_stream():
    ids, bounds, lengths = _windows(1, 200)
    batches = token_budget_batches(lengths, 300)
    cuda = torch.device("cuda")
    feed = DeviceFeed(ids, bounds, batches, cuda)
    sums = []
    for fed in feed:
        assert fed.host.input_ids.is_pinned() and fed.batch.input_ids.is_cuda
        total = (fed.batch.input_ids * 2).sum()  # compute queued on the current stream
        feed.prefetch()  # the next copy overlaps it
        sums.append(int(total))
        ref = pack_flat(torch.from_numpy(fed.ids), lengths[batches[fed.index]])
        _same(fed.batch, ref)
    expected = [2 * int(sum(ids[bounds[w] : bounds[w + 1]].sum() for w in b)) for b in batches]
    assert sums == expected


# ---- the long-note memory bench ------------------------------------------------------------
def test_memory_bench_builds_like_for_like_sides_and_measures_a_shard(tmp_path):
    from jobs.bench.memory import build, measure

    chars = lambda path: sum(map(len, pq.read_table(path)["text"].to_pylist()))  # noqa: E731
    same = build(tmp_path / "work", "small", notes=8, long=2, long_chars=30_000, same_work=True)
    long = pq.read_table(same["long"])["text"].to_pylist()
    assert len(long) == 8 and sorted(map(len, long))[-2:] == [30_000, 30_000]
    assert chars(same["normal"]) >= chars(same["long"])  # the same work for the encoder
    assert max(map(len, pq.read_table(same["normal"])["text"].to_pylist())) < 30_000
    rows = build(tmp_path / "rows", "small", notes=8, long=2, long_chars=30_000, same_work=False)
    assert pq.read_metadata(rows["normal"]).num_rows == 8
    got = measure(same["long"], same["model"], str(tmp_path / "out"), "windows", 1)
    assert got["rows"] == 8 and got["peak_mib"] >= got["rss_before_mib"] > 0


_MANY_SHAPES = """
import sys, torch, torch.nn.functional as F
from clinicalbert_core.ops import PackedLinear, bound_onednn_caches
bound_onednn_caches()  # as a runner does when it is created
def rss():
    return next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmRSS"))
torch.set_num_threads(1)
lin = PackedLinear(torch.nn.Linear(256, 1024))
with torch.inference_mode():
    F.gelu(lin(torch.randn(8, 256)))
    start = rss()
    for n in range(100, 2100, 5):  # a new token count every call, as encoder batches have
        F.gelu(lin(torch.randn(n, 256)))
print((rss() - start) / 1024)
"""


def test_runtime_memory_stays_flat_over_many_batch_shapes():
    """A runner (or `bound_onednn_caches()`) bounds torch's oneDNN caches (a value the user sets wins):
    400 shapes of a packed linear + GELU grow the process far less than with the default
    1,024 entries (each a kernel with its buffers)."""
    import os
    import subprocess
    import sys

    from clinicalbert_core.ops import packed_linear_supported

    if not packed_linear_supported(torch.float32):
        pytest.skip("this torch build has no oneDNN packed linear")

    def growth_mib(**env: str) -> float:
        done = subprocess.run([sys.executable, "-c", _MANY_SHAPES], capture_output=True,
                              text=True, env={**os.environ, **env}, check=True)  # fmt: skip
        return float(done.stdout.split()[-1])

    bounded = growth_mib()
    unbounded = growth_mib(ONEDNN_PRIMITIVE_CACHE_CAPACITY="1024", LRU_CACHE_CAPACITY="1024")
    print(f"400 shapes: +{bounded:.0f} MiB bounded, +{unbounded:.0f} MiB with 1,024 entries")
    assert bounded < 100 and unbounded > 2 * bounded, (bounded, unbounded)
