"""The job spec: configs validate, bad specs fail with field paths and values, hashing."""

from __future__ import annotations

import copy
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from clinicalbert_core import limits
from clinicalbert_core.limits import default_stride
from jobs import spec as spec_mod
from jobs.spec import JobSpec, SpecError, json_schema, load_spec, parse_spec

CONFIGS = sorted((Path(__file__).parent.parent / "configs").glob("*.yaml"))


def minimal_spec() -> dict:
    """The smallest valid spec, its paths relative (notes.parquet, model, out)."""
    return {
        "name": "t",
        "corpus": {"format": "parquet", "paths": ["notes.parquet"]},
        "model": {"variant": "custom", "path": "model"},
        "device_pool": [{"name": "cpu", "device": "cpu"}],
        "output": {"path": "out"},
    }


def base(tmp_path: Path) -> dict:
    """minimal_spec(), with its corpus file and model dir made under tmp_path."""
    (tmp_path / "notes.parquet").write_bytes(b"")
    (tmp_path / "model").mkdir(exist_ok=True)
    return minimal_spec()


def errors(data: dict, tmp_path: Path, **kw) -> str:
    with pytest.raises(SpecError) as e:
        parse_spec(data, tmp_path, source="job.yaml", **kw)
    return str(e.value)


@pytest.mark.parametrize("path", CONFIGS, ids=[p.name for p in CONFIGS])
def test_configs_validate(path: Path):
    spec = load_spec(path, check_paths=False)
    assert isinstance(spec, JobSpec)
    assert len(spec.spec_hash()) == 64


def test_configs_cover_the_examples():
    assert {p.name for p in CONFIGS} >= {
        "demo.yaml", "mimic3_noteevents.yaml", "mimic4_discharge.yaml", "mixed_pool.yaml",
        "mimic4_bioclinical_modernbert.yaml", "readmission.yaml", "deid.yaml",
    }  # fmt: skip


def test_defaults_and_resolved_paths(tmp_path: Path):
    spec = parse_spec(base(tmp_path), tmp_path)
    assert spec.corpus.paths == (str(tmp_path / "notes.parquet"),)
    assert spec.model.path == str(tmp_path / "model")
    assert spec.output.path == str(tmp_path / "out")
    assert (spec.corpus.id_column, spec.corpus.text_column) == ("id", "text")
    assert spec.model.long_notes.strategy == "windows" and spec.model.max_seq == 512
    assert spec.heads.embeddings and not spec.heads.mlm.enabled
    assert spec.run.shard_rows == 20000
    assert spec.device_pool[0].precision == "auto"
    data = spec.resolved_json()
    assert data["run"]["max_shard_attempts"] == 3
    assert parse_spec(data, "/elsewhere") == spec  # the resolved spec round-trips


@pytest.mark.parametrize(
    ("max_seq", "long_notes", "stride"),
    [(512, {}, 128), (258, {}, 128), (200, {}, 99), (128, {}, 63), (8, {}, 3),
     (128, {"aggregate": "first"}, 63), (128, {"stride": 0}, 0), (512, {"stride": 300}, 300)],
)  # fmt: skip
def test_stride_left_out_follows_max_seq(tmp_path: Path, max_seq, long_notes, stride):
    data = base(tmp_path)
    data["model"].update(max_seq=max_seq, long_notes=long_notes)
    spec = parse_spec(data, tmp_path)
    assert spec.model.long_notes.stride == stride
    assert spec.resolved_json()["model"]["long_notes"]["stride"] == stride  # hashed as resolved
    # the runtime's own default is the same rule (clinicalbert_core.limits)
    assert long_notes or default_stride(max_seq) == stride


def test_uris_are_kept_and_not_checked(tmp_path: Path):
    data = base(tmp_path)
    data["corpus"]["paths"] = ["s3://bucket/notes/*.parquet", "file:///nonexistent/x.parquet"]
    data["output"]["path"] = "gs://bucket/out"
    spec = parse_spec(data, tmp_path)
    assert spec.corpus.paths == ("s3://bucket/notes/*.parquet", "file:///nonexistent/x.parquet")
    assert spec.output.path == "gs://bucket/out"


@pytest.mark.parametrize(
    "edit, path, value",
    [
        (lambda d: d["corpus"].update(bogus=1), "corpus.bogus", "1"),
        (lambda d: d.update(extra={"a": 1}), "extra", "{'a': 1}"),
        (lambda d: d["run"].update(shard_rows="100"), "run.shard_rows", "'100'"),
        (lambda d: d["run"].update(shard_rows=True), "run.shard_rows", "True"),
        (lambda d: d["run"].update(shard_rows=0), "run.shard_rows", "0"),
        (lambda d: d["corpus"].update(format="xml"), "corpus.format", "'xml'"),
        (lambda d: d["heads"].update(pooling="max"), "heads.pooling", "'max'"),
        (lambda d: d["model"].update(variant="gpt2"), "model.variant", "'gpt2'"),
        (lambda d: d["model"].update(max_seq=4), "model.max_seq", "4"),
        (
            lambda d: d["device_pool"][1].update(device="cuda:0"),
            "device_pool[1].device",
            "'cuda:0'",
        ),
        (lambda d: d["device_pool"][1].update(device="tpu"), "device_pool[1].device", "'tpu'"),
        (
            lambda d: d["device_pool"][1].update(precision="fp16"),
            "device_pool[1].precision",
            "'fp16'",
        ),
        (
            lambda d: d["device_pool"][1].update(precision="fp64"),
            "device_pool[1].precision",
            "'fp64'",
        ),
        (lambda d: d["device_pool"][1].update(name="gpu"), "device_pool[1].name", "'gpu'"),
        (
            lambda d: d["device_pool"][1].update(accelerator_type="H100"),
            "device_pool[1].accelerator_type",
            "'H100'",
        ),
        (
            lambda d: d["device_pool"][0].update(batch_tokens=100),
            "device_pool[0].batch_tokens",
            "100",
        ),
        (lambda d: d.update(device_pool=[]), "device_pool", "[]"),
        (lambda d: d.update(name="bad name"), "name", "'bad name'"),
        (
            lambda d: d["corpus"].update(paths=["missing.parquet"]),
            "corpus.paths[0]",
            "'missing.parquet'",
        ),
        (
            lambda d: d["corpus"].update(paths=["notes.parquet", "*.nothing"]),
            "corpus.paths[1]",
            "'*.nothing'",
        ),
        (lambda d: d["corpus"].update(paths=["x.parquet.gz"]), "corpus.paths[0]", "'x.parquet.gz'"),
        (lambda d: d["corpus"].update(paths=[]), "corpus.paths", "[]"),
        (lambda d: d["corpus"].update(where={"A": {"b": 1}}), "corpus.where.A", "{'b': 1}"),
        (lambda d: d["corpus"].update(keep_columns=["a", "a"]), "corpus.keep_columns[1]", "'a'"),
        (
            lambda d: d["corpus"].update(keep_columns=["row_index"]),
            "corpus.keep_columns[0]",
            "'row_index'",
        ),
        (
            lambda d: d["corpus"].update(keep_columns=["x", "mlm_window"]),
            "corpus.keep_columns[1]",
            "'mlm_window'",
        ),
        (lambda d: d["corpus"].update(text_column="id"), "corpus.text_column", "'id'"),
        (lambda d: d["corpus"].update(csv={"delimiter": ";"}), "corpus.csv", "{'delimiter': ';'"),
        (
            lambda d: d["corpus"].update(format="text", id_column="ROW_ID"),
            "corpus.id_column",
            "'ROW_ID'",
        ),
        (lambda d: d["corpus"].update(limit=0), "corpus.limit", "0"),
        (lambda d: d["model"].update(path="nope"), "model.path", "'nope'"),
        (lambda d: d["model"].update(hub={"repo": "a/b"}), "model.hub", "{'repo': 'a/b'"),
        (lambda d: d["model"].pop("path"), "model.path", "None"),
        (lambda d: d["model"].update(long_notes={"stride": 510}), "model.long_notes.stride", "510"),
        (
            lambda d: d["model"].update(long_notes={"strategy": "chunks"}),
            "model.long_notes.strategy",
            "'chunks'",
        ),
        (lambda d: d["heads"].update(embeddings=False), "heads.embeddings", "False"),
        (lambda d: d["heads"].update(mlm={"enabled": True, "top_k": 0}), "heads.mlm.top_k", "0"),
        (lambda d: d["output"].update(vector_dtype="bf16"), "output.vector_dtype", "'bf16'"),
    ],
)
def test_bad_specs_name_field_and_value(tmp_path: Path, edit, path: str, value: str):
    data = base(tmp_path)
    data["device_pool"].append({"name": "gpu2", "device": "cpu"})
    data["device_pool"][0] = {"name": "gpu", "device": "cuda"}
    data.update(heads={}, run={})
    edit(data)
    message = errors(data, tmp_path)
    line = next((ln for ln in message.splitlines() if f": {path}: " in ln), None)
    assert line is not None, message
    assert line.startswith("job.yaml: ")
    assert f"(got {value}" in line, line


def test_missing_required_field(tmp_path: Path):
    data = base(tmp_path)
    del data["output"]
    assert errors(data, tmp_path) == "job.yaml: output: required field is missing"


def test_every_problem_reported_one_per_line(tmp_path: Path):
    data = base(tmp_path)
    data["corpus"]["bogus"] = 1
    data["device_pool"][0]["device"] = "gpu"
    data["run"] = {"batch_rows": -1}
    lines = errors(data, tmp_path).splitlines()
    assert [ln.split(": ")[1] for ln in lines] == [
        "corpus.bogus",
        "device_pool[0].device",
        "run.batch_rows",
    ]


def test_long_values_are_truncated(tmp_path: Path):
    data = base(tmp_path)
    data["corpus"]["format"] = "x" * 500
    (line,) = errors(data, tmp_path).splitlines()
    assert len(line) < 250 and line.endswith("...)")


def test_check_paths_false_skips_existence(tmp_path: Path):
    data = base(tmp_path)
    data["corpus"]["paths"] = ["missing/*.parquet"]
    data["model"]["path"] = "missing_model"
    spec = parse_spec(data, tmp_path, check_paths=False)
    assert spec.corpus.paths == (str(tmp_path / "missing/*.parquet"),)


def test_hub_and_variant_sources(tmp_path: Path):
    data = base(tmp_path)
    data["model"] = {"variant": "bio_clinicalbert"}  # the variant's hub id is used
    assert parse_spec(data, tmp_path).model.hub is None
    data["model"] = {"variant": "custom", "hub": {"repo": "org/model", "revision": "abc123"}}
    assert parse_spec(data, tmp_path).model.hub.revision == "abc123"


def test_text_format_takes_dirs_and_rejects_columns(tmp_path: Path):
    data = base(tmp_path)
    (tmp_path / "notes").mkdir()
    data["corpus"] = {"format": "text", "paths": ["notes"]}
    assert parse_spec(data, tmp_path).corpus.read_columns() == ("id", "text")
    data["corpus"]["keep_columns"] = ["a"]
    assert "corpus.keep_columns: " in errors(data, tmp_path)


def test_where_values(tmp_path: Path):
    data = base(tmp_path)
    data["corpus"]["where"] = {"CATEGORY": "Discharge summary", "ISERROR": [None, 0]}
    spec = parse_spec(data, tmp_path)
    assert spec.corpus.where == {"CATEGORY": "Discharge summary", "ISERROR": (None, 0)}
    assert spec.resolved_json()["corpus"]["where"]["ISERROR"] == [None, 0]


def write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "job.yaml"
    path.write_text(text)
    return path


def test_yaml_syntax_error_names_file_and_line(tmp_path: Path):
    path = write(tmp_path, "name: t\ncorpus:\n  format: parquet\n  paths: [a, b\nmodel: {}\n")
    with pytest.raises(SpecError) as e:
        load_spec(path)
    assert str(path) in str(e.value) and "line 5" in str(e.value)


def test_yaml_duplicate_key_is_an_error(tmp_path: Path):
    path = write(tmp_path, "name: t\nname: u\n")
    with pytest.raises(SpecError, match=r"line 2, column 1: .*duplicate key 'name'"):
        load_spec(path)


@pytest.mark.parametrize("text", ["", "- a\n- b\n", "just a string\n"])
def test_top_level_must_be_a_mapping(tmp_path: Path, text: str):
    with pytest.raises(SpecError, match="top level must be a mapping"):
        load_spec(write(tmp_path, text))


def test_missing_directory_or_binary_spec_file(tmp_path: Path):
    with pytest.raises(SpecError, match="nope.yaml: cannot read the spec"):
        load_spec(tmp_path / "nope.yaml")
    with pytest.raises(SpecError, match="cannot read the spec: Is a directory"):
        load_spec(tmp_path)
    (tmp_path / "job.yaml").write_bytes(b"name: x\n\x8a\xff\x00binary")
    with pytest.raises(SpecError, match=r"job.yaml: not a YAML text file \(byte 8 is not UTF-8\)"):
        load_spec(tmp_path / "job.yaml")


LAUGHS = "a: &a [lol, lol, lol, lol, lol, lol, lol, lol, lol]\n" + "".join(
    f"{c}: &{c} [{', '.join([f'*{p}'] * 9)}]\n" for p, c in zip("abcdefgh", "bcdefghi")
)  # a 1 KB spec that stands for 9**9 strings


@pytest.mark.parametrize("text, expect", [
    ("? [a, b]\n: 1\n", r"line 1, column 3: invalid YAML: a key must be a name, not a list"),
    ("? {a: 1}\n: 1\n", r"invalid YAML: a key must be a name"),
    (LAUGHS, r"job.yaml: more than 100,000 values once YAML aliases are expanded"),
    ("a: &x [1, *x]\n", r"job.yaml: a\[1\]: a value that contains itself"),
    ("a: " + "[" * 5000 + "]" * 5000 + "\n", r"invalid YAML: .*nest"),
    ("name: " + "x" * 50_000 + "\n", r"job.yaml: name: a string of 50,000 characters; at most"),
    ("name: x\n? " + "w" * 5000 + "\n: 1\n", r"job.yaml: \(top level\): a string of 5,000 char"),
])  # fmt: skip
def test_hostile_yaml_is_one_line_in_well_under_a_second(tmp_path: Path, text, expect):
    import time

    start = time.monotonic()
    with pytest.raises(SpecError) as e:
        load_spec(write(tmp_path, text))
    assert time.monotonic() - start < 2
    assert len(e.value.problems) == 1 and len(str(e.value)) < 300, str(e.value)[:300]
    assert re.search(expect, str(e.value)), str(e.value)[:300]


def test_a_spec_file_over_the_size_cap_is_not_read(tmp_path: Path):
    path = write(tmp_path, "name: " + "x" * (2 << 20) + "\n")
    with pytest.raises(SpecError, match=r"the spec is 2,097,159 bytes; at most 1,048,576"):
        load_spec(path)


def test_many_problems_are_capped_with_a_count(tmp_path: Path):
    data = base(tmp_path) | {f"k{i}": i for i in range(5000)}
    with pytest.raises(SpecError) as e:
        parse_spec(data, tmp_path, source="job.yaml")
    assert len(e.value.problems) == 21 and e.value.problems[-1] == "... and 4,980 more problems"
    big = base(tmp_path) | {"name": [list(range(20_000))] * 4}  # shown short, never whole
    assert (
        errors(big, tmp_path)
        == "job.yaml: name: Input should be a valid string (got [[0, 1, 2, 3, ...], [0, 1, 2, 3, ...], [0, 1, 2, 3, ...], [0, 1, 2, 3, ...]])"
    )


@pytest.mark.parametrize("key, section, near", [
    ("modle", "", "model"), ("formt", "corpus.", "format"), ("max_sq", "model.", "max_seq"),
    ("actor", "device_pool[0].", "actors"), ("strategy_", "model.long_notes.", "strategy"),
])  # fmt: skip
def test_unknown_keys_suggest_the_near_name(tmp_path: Path, key, section, near):
    data = base(tmp_path)
    node = data
    for part in re.findall(r"[^.\[\]]+", section):
        node = node[int(part)] if part.isdigit() else node.setdefault(part, {})
    node[key] = 1
    assert f"job.yaml: {section}{key}: unknown key (did you mean {near!r}?)" in errors(
        data, tmp_path
    )


def test_load_spec_resolves_against_the_file_dir(tmp_path: Path):
    sub = tmp_path / "specs"
    sub.mkdir()
    data = base(tmp_path)
    data["corpus"]["paths"] = ["../notes.parquet"]
    data["model"]["path"] = "../model"
    (sub / "job.yaml").write_text(yaml.safe_dump(data))
    spec = load_spec(sub / "job.yaml")
    assert spec.corpus.paths == (str(tmp_path / "notes.parquet"),)
    bad = copy.deepcopy(data)
    bad["corpus"]["paths"] = ["notes.parquet"]  # relative to specs/, where it does not exist
    (sub / "job.yaml").write_text(yaml.safe_dump(bad))
    with pytest.raises(SpecError, match=r"job\.yaml: corpus\.paths\[0\]: does not exist"):
        load_spec(sub / "job.yaml")


def test_spec_hash(tmp_path: Path):
    data = base(tmp_path)
    h = parse_spec(data, tmp_path).spec_hash()
    assert parse_spec(copy.deepcopy(data), tmp_path).spec_hash() == h
    same = copy.deepcopy(data)
    same["device_pool"] = [{"name": "g", "device": "cuda", "actors": 8, "precision": "bf16"}]
    same["run"] = {"progress_interval_s": 1, "dry_run_notes": 5, "batch_rows": 7}
    assert parse_spec(same, tmp_path).spec_hash() == h
    for section, key, value in [
        ("corpus", "where", {"a": 1}),
        ("corpus", "text_column", "TEXT"),
        ("model", "max_seq", 256),
        ("run", "shard_rows", 10),
    ]:
        other = copy.deepcopy(data)
        other.setdefault(section, {})[key] = value
        assert parse_spec(other, tmp_path).spec_hash() != h, key
    (tmp_path / "other.parquet").write_bytes(b"")
    other = copy.deepcopy(data)
    other["corpus"]["paths"] = ["other.parquet"]
    assert parse_spec(other, tmp_path).spec_hash() != h


def test_spec_is_frozen(tmp_path: Path):
    spec = parse_spec(base(tmp_path), tmp_path)
    with pytest.raises(ValueError):
        spec.name = "x"


def test_json_schema():
    schema = json_schema()
    assert set(schema["properties"]) == {
        "name",
        "corpus",
        "model",
        "heads",
        "device_pool",
        "output",
        "run",
    }
    assert set(schema["required"]) == {"name", "corpus", "model", "device_pool", "output"}
    assert schema["additionalProperties"] is False
    defs = schema["$defs"]
    assert "bio_clinicalbert" in defs["ModelSpec"]["properties"]["variant"]["enum"]
    assert defs["PoolSpec"]["properties"]["device"]["enum"] == ["cpu", "cuda", "mps"]
    assert defs["RunSpec"]["properties"]["shard_rows"]["default"] == 20000
    assert all(p.get("description") for p in defs["CorpusSpec"]["properties"].values())


def test_variant_names_come_from_the_runtime_without_torch(tmp_path: Path):
    """The spec reads the variant presets from clinicalbert_core.variants, which imports no
    torch: validating a spec never loads the model runtime."""
    from clinicalbert_core.variants import VARIANTS

    assert json_schema()["$defs"]["ModelSpec"]["properties"]["variant"]["enum"] == list(VARIANTS)
    data = base(tmp_path)
    data["model"] = {"variant": "bio_clinicalbert"}
    assert parse_spec(data, tmp_path).model.variant == "bio_clinicalbert"
    data["model"] = {"variant": "nope", "path": "model"}
    assert f"model.variant: unknown variant; expected one of {', '.join(VARIANTS)}" in errors(
        data, tmp_path
    )
    data["model"] = {"variant": "huang_clinicalbert"}
    assert "variant 'huang_clinicalbert' has no hub id: give path or hub" in errors(data, tmp_path)
    code = "import sys, jobs.spec; print(sorted({'torch', 'tokenizers'} & set(sys.modules)))"
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert done.stdout.strip() == "[]", done.stdout


def test_spec_and_runtime_rules_share_one_home(tmp_path: Path):
    """Stride, token budget and precision are checked by clinicalbert_core.limits for the spec
    (its wording: the field path before, `auto` among the alternatives) and the runtime."""
    from jobs.fs import is_uri

    assert spec_mod.is_uri is is_uri  # one is_uri, still importable from jobs.spec
    data = base(tmp_path)
    data["model"].update(max_seq=128, long_notes={"stride": 126})
    data["device_pool"] = [
        {"name": "a", "device": "cpu", "batch_tokens": 100},
        {"name": "b", "device": "cpu", "precision": "fp16"},
        {"name": "c", "device": "cuda", "precision": "int8"},
    ]
    lines = errors(data, tmp_path).splitlines()
    assert "job.yaml: model.long_notes.stride: must be < max_seq - 2 = 126 (got 126)" in lines
    assert (
        "job.yaml: device_pool[1].precision: fp16 is not supported on cpu; use fp32, bf16, "
        "int8 or auto (got 'fp16')" in lines
    )
    assert (
        "job.yaml: device_pool[2].precision: int8 runs on cpu only; on cuda use auto, bf16, "
        "fp16 or fp32 (got 'int8')" in lines
    )
    data["device_pool"] = data["device_pool"][:1]
    data["model"]["long_notes"] = {}
    (line,) = errors(data, tmp_path).splitlines()
    assert line == "job.yaml: device_pool[0].batch_tokens: must be >= model.max_seq (128) (got 100)"
    # the runtime's wording of the same rules
    assert limits.stride_problem(126, 128) == (
        "stride (tokens shared by consecutive windows) must be in [0, 126) for max_seq 128, got 126"
    )
    assert limits.stride_problem(-1, 128) is not None and limits.stride_problem(125, 128) is None
    assert limits.batch_tokens_problem(100, 128) == "batch_tokens 100 must be at least max_seq 128"
    assert limits.batch_tokens_problem(128, 128) is None
    assert limits.precision_problem("cpu", "fp16") == (
        "precision fp16 is not supported on cpu; use fp32, bf16 or int8"
    )
    assert limits.precision_problem("mps", "int8") == (
        "precision int8 runs on cpu only; on mps use bf16, fp16 or fp32"
    )
    assert limits.precision_problem("mps", "fp16") is None
    assert limits.max_seq_problem(1024, 512) == (
        "max_seq 1024 exceeds the model's max_position_embeddings 512"
    )
    assert limits.max_seq_problem(1024, 512, variant="custom") == (
        "model.max_seq: 1024 exceeds the model's max_position_embeddings 512 (config.json of custom)"
    )
    assert limits.max_seq_problem(512, 512) is None
    assert limits.body_tokens(512) == 510 and limits.FRAMING_TOKENS == 2


def test_set_overrides_and_staging_outside_the_output(tmp_path: Path):
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(base(tmp_path)))
    spec = load_spec(path, overrides=["model.max_seq=256", "device_pool[0].actors=3",
                                      "corpus.where.CATEGORY=Discharge summary",
                                      "run.keep_staged=true"])  # fmt: skip
    assert spec.model.max_seq == 256 and spec.device_pool[0].actors == 3
    assert spec.corpus.where == {"CATEGORY": "Discharge summary"} and spec.run.keep_staged
    assert spec.staging_dir() == str(tmp_path / "out") + ".staging"
    with pytest.raises(SpecError, match="model.max_seq: Input should be greater"):
        load_spec(path, overrides=["model.max_seq=2"])
    with pytest.raises(SpecError, match=r"--set device_pool.5.x: device_pool.5 is not a section"):
        load_spec(path, overrides=["device_pool.5.x=1"])
    with pytest.raises(SpecError, match="expected key.path=value"):
        load_spec(path, overrides=["model.max_seq"])
    inside = base(tmp_path) | {"run": {"staging_dir": "out/staged"}}
    assert "run.staging_dir: must not be inside output.path" in errors(inside, tmp_path)
    # fields that do not change the vectors do not change the job's identity
    a = parse_spec(base(tmp_path), tmp_path)
    b = parse_spec(base(tmp_path) | {"run": {"staging_dir": "/elsewhere", "keep_staged": True,
                                             "allow_empty": True}}, tmp_path)  # fmt: skip
    assert a.spec_hash() == b.spec_hash()
    c = parse_spec(base(tmp_path) | {"heads": {"normalize": True}}, tmp_path)
    assert c.spec_hash() != a.spec_hash()


def test_every_pool_that_does_not_fit_the_cluster_is_named_at_once():
    """One check names every pool problem (no GPU anywhere, a pool too big for any node),
    instead of one per run, each after a Ray start-up."""
    from jobs.preflight import pool_problems
    from jobs.spec import PoolSpec

    pools = (
        PoolSpec(name="gpu", device="cuda", actors=4),
        PoolSpec(name="big", device="cpu", actors=1, cpus_per_actor=64),
        PoolSpec(name="small", device="cpu", actors=2, cpus_per_actor=2),
        PoolSpec(name="huge", device="cpu", actors=1, cpus_per_actor=128),
    )
    nodes = [{"Alive": True, "Resources": {"CPU": 16}}, {"Alive": False, "Resources": {"CPU": 256}}]
    problems = pool_problems(pools, nodes)
    assert len(problems) == 3 and problems[0].startswith(
        "device_pool: the spec's GPU pools need 4 GPU(s) but this Ray cluster has none"
    )
    assert problems[1].startswith("device_pool[1] (big): one actor needs 64 CPU but no node")
    assert problems[2].startswith("device_pool[3] (huge): one actor needs 128 CPU")
    nodes[0]["Resources"] = {"CPU": 64, "GPU": 1}
    assert [p[:18] for p in pool_problems(pools, nodes)] == ["device_pool[3] (hu"]
