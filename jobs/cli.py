"""`clinicalbert` / `python -m jobs`: run, validate, verify, schema, prepare, inspect, bench,
demo-data."""

from __future__ import annotations

import argparse
import json
import logging
import os
import signal
import sys
from pathlib import Path
from typing import Any

from clinicalbert_core.errors import describe


def _prepare(args: argparse.Namespace) -> int:
    from clinicalbert_core.hub import prepare

    lowercase = True if args.lowercase else False if args.cased else None
    out = prepare(args.source, args.out, variant=args.variant, lowercase=lowercase,
                  revision=args.revision)  # fmt: skip
    print(f"prepared {out}")
    return 0


def _inspect(args: argparse.Namespace) -> int:
    from clinicalbert_core.architectures import architecture
    from clinicalbert_core.inspection import inspect

    info = inspect(args.path)
    failed = 1 if info["integrity"] or info["contradictions"] else 0
    if args.json:
        print(json.dumps(info, indent=2))
        return failed
    c = info["config"]
    casing = {True: "uncased (lowercase)", False: "cased", None: "unknown"}[info["lowercase"]]
    heads = ", ".join(k for k, v in info["heads"].items() if v) or "none"
    print(f"{info['path']}")
    print(f"  variant     {info['variant']}")
    print(f"  source      {json.dumps(info['source']) if info['source'] else '-'}")
    print(f"  arch        {info['architecture']}")
    print(f"  shape       vocab {c['vocab_size']}, hidden {c['hidden_size']}, layers "
          f"{c['num_hidden_layers']}, heads {c['num_attention_heads']}, ffn {c['intermediate_size']}, "
          f"positions {c['max_position_embeddings']}")  # fmt: skip
    for label, text in architecture(info["architecture"]).inspect_lines(info):
        print(f"  {label:<12}{text}")
    print(f"  tokenizer   {info['tokenizer']}, specials {info['specials']}")
    for note in info["tokenizer_notes"]:
        print(f"              {note}")
    print(f"  casing      {casing}")
    print(f"  heads       {heads}")
    if info["classifier"]:
        print(f"  classifier  {info['classifier']['description']}")
    print(f"  parameters  {info['parameters']:,}")
    for name, digest in info["sha256"].items():
        print(f"  sha256      {digest}  {name}")
    if not info["prepared"]:
        print("  integrity   not checked (no manifest: not a prepared dir)")
    for problem in info["integrity"]:
        print(f"  CORRUPT     {problem}")
    if not info["integrity"] and info["prepared"]:
        print("  integrity   every file matches the manifest")
    for problem in info["contradictions"]:  # the config says one model, the weights another
        print(f"  MISMATCH    config vs weights: {problem}")
    return failed


def _validate(args: argparse.Namespace) -> int:
    from .preflight import (
        check_corpus,
        check_model,
        check_output,
        check_plan,
        corpus_warnings,
        output_state_problems,
        pool_problems,
    )
    from .spec import load_spec

    spec = load_spec(args.spec, check_paths=not args.no_check_paths, overrides=args.set)
    problems = []
    if not args.no_check_paths:
        problems = check_corpus(spec) + (check_output(spec) or output_state_problems(spec))
        problems += check_model(spec)
        problems += [] if problems else check_plan(spec)
    address = args.address or os.environ.get("RAY_ADDRESS")
    if address:  # a cluster to check the pools against
        import ray

        ray.init(address=address, logging_level=logging.WARNING)
        try:
            problems += pool_problems(spec.device_pool, ray.nodes())
        finally:
            ray.shutdown()
    notes = [p for p in problems if p.startswith("model: not checked")]
    problems = [p for p in problems if p not in notes]
    if not args.no_check_paths and not problems:
        notes += [f"warning: {w}" for w in corpus_warnings(spec)]
    for line in problems:
        print(f"{args.spec}: {line}", file=sys.stderr)
    for line in notes:
        print(f"{args.spec}: {line}")
    if problems:
        return 2
    pools = ", ".join(f"{p.name} ({p.actors}x {p.device})" for p in spec.device_pool)
    print(f"{args.spec}: valid. job {spec.name!r}, {spec.corpus.format} corpus, "
          f"variant {spec.model.variant}, pools {pools}, spec hash {spec.spec_hash()[:12]}")  # fmt: skip
    return 0


def _schema(args: argparse.Namespace) -> int:
    from .spec import json_schema

    print(json.dumps(json_schema(), indent=2))
    return 0


def _run(args: argparse.Namespace) -> int:
    from .dispatch import FailedShard
    from .driver import run_job
    from .dry_run import dry_run_job, print_dry_run
    from .spec import load_spec
    from .watch import NodeLost

    spec = load_spec(args.spec, overrides=args.set)
    signal.signal(signal.SIGTERM, _interrupt)  # stop like Ctrl-C: actors first, partial report
    try:
        if args.dry_run:
            report = dry_run_job(spec)
        else:
            report = run_job(spec, overwrite=args.overwrite, address=args.address)
    except NodeLost as e:  # stopped like an interrupt: actors gone, partial report written
        assert e.shards is not None  # counted by the driver once its run has stopped
        committed, total = e.shards
        if total is None:  # died while planning: nothing of this run was dispatched
            print(f"error: {e} while planning shards; nothing was encoded by this run "
                  f"({committed} shards committed earlier are kept); run the same command "
                  "again to resume", file=sys.stderr)  # fmt: skip
        else:
            print(f"error: {e} mid-job; {committed} of {total} shards are committed and kept "
                  "(partial _report.json, interrupted: true); run the same command again to "
                  "resume", file=sys.stderr)  # fmt: skip
        return 3
    if args.dry_run:
        print_dry_run(report)
    failed = report["shards"]["failed"]
    print(f"{'dry run' if args.dry_run else 'job'} {spec.name}: {report['rows_in']:,} rows in, "
          f"{report['rows_out']:,} notes out, {report['error_rows']:,} error rows, "
          f"{report['filtered_rows']:,} filtered, {report['tokens']:,} tokens; this run "
          f"{report['shards']['processed']} shards in {report['wall_s']:.1f}s "
          f"({report['shards']['committed_before']} committed earlier), {len(failed)} failed "
          f"-> {report['output']}")  # fmt: skip
    mixed = report.get("notes_by_precision", {})
    if len(mixed) > 1:  # mixed pools, or a resume on other hardware: each part names its own
        print(f"{'dry run' if args.dry_run else 'job'} {spec.name}: notes by precision "
              + ", ".join(f"{p or 'unrecorded'} {n:,}" for p, n in sorted(mixed.items()))
              + " (each part's metadata names its precision)")  # fmt: skip
    for f in failed:  # none of their rows is written; the same command retries them
        print(f"failed: {FailedShard(**f).where()}: {f['error']}", file=sys.stderr)
    if report.get("empty"):
        print(f"job {spec.name}: {report['empty']}", file=sys.stderr)
    return 1 if failed or report.get("empty") else 0


def _verify(args: argparse.Namespace) -> int:
    from .verify import verify_output

    findings = verify_output(args.output)
    for line in findings:
        print(f"{args.output}: {line}")
    if not findings:
        print(f"{args.output}: ok")
    return 1 if findings else 0


def _interrupt(signum: int, frame: Any) -> None:
    raise KeyboardInterrupt(f"signal {signum}")


def _demo_data(args: argparse.Namespace) -> int:
    from clinicalbert_core.hub import prepare

    from .synthetic import make_model, make_task_model, write_corpus

    root = Path(args.out)
    corpus = write_corpus(root / "corpus" / "notes.parquet", args.notes, seed=args.seed)
    raw = make_model(root / "raw_model", hidden=args.hidden, layers=args.layers, seed=args.seed)
    model = prepare(raw, root / "model", variant="custom", lowercase=False)
    print(f"demo corpus {corpus} ({args.notes} notes), model {model}")
    for task in ("readmission", "deid"):
        task_raw = make_task_model(raw, root / f"raw_{task}", task, seed=args.seed)
        prepared = prepare(task_raw, root / task, variant="custom", lowercase=False)
        print(f"demo {task} model {prepared}")
    return 0


def _bench(args: argparse.Namespace, rest: list[str]) -> int:
    from .bench import main as bench_main

    return bench_main(rest)


def build_parser() -> argparse.ArgumentParser:
    from .output import package_version

    p = argparse.ArgumentParser(prog="clinicalbert", description=__doc__)
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    p.add_argument("--version", action="version", version=f"clinicalbert {package_version()}")
    sub = p.add_subparsers(dest="command", required=True)
    _job_commands(sub)
    _model_commands(sub)
    return p


def _job_commands(sub: Any) -> None:
    """run, validate, verify, schema: the commands about a job spec and its output."""
    set_help = ("override a spec field, value as YAML (repeatable): --set model.max_seq=256, "
                "--set device_pool[0].actors=8")  # fmt: skip
    s = sub.add_parser("run", help="run a job spec (local Ray, or the cluster at RAY_ADDRESS)")
    s.add_argument("spec", help="job spec YAML")
    s.add_argument("--dry-run", action="store_true",
                   help="sample the corpus on a local Ray, print rates and projections")  # fmt: skip
    s.add_argument("--overwrite", action="store_true",
                   help="replace an output dir written by a different spec")  # fmt: skip
    s.add_argument("--address", default=None, help="Ray address (default: RAY_ADDRESS or local)")
    s.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help=set_help)
    s.set_defaults(func=_run)

    s = sub.add_parser(
        "validate",
        help="check a job spec against its corpus columns, model and (with --address or "
        "RAY_ADDRESS) cluster, without running anything",
    )
    s.add_argument("spec", help="job spec YAML")
    s.add_argument("--no-check-paths", action="store_true",
                   help="check the spec alone (e.g. a cluster spec on a laptop): no corpus or "
                   "model files are opened")  # fmt: skip
    s.add_argument("--address", default=None, help="Ray cluster to check the pools against")
    s.add_argument("--set", action="append", default=[], metavar="KEY=VALUE", help=set_help)
    s.set_defaults(func=_validate)

    s = sub.add_parser("verify", help="re-check a finished output dir (parts, ids, report)")
    s.add_argument("output", help="the job's output.path (local path or URI)")
    s.set_defaults(func=_verify)

    s = sub.add_parser("schema", help="print the job spec's JSON Schema")
    s.set_defaults(func=_schema)


def _model_commands(sub: Any) -> None:
    """prepare, inspect, demo-data, bench: models, demo data and benchmarks."""
    s = sub.add_parser("prepare", help="make a self-contained model dir from a local dir or hub id")
    s.add_argument("source", help="local dir, model.safetensors, or hub repo id (org/name)")
    s.add_argument("--variant", default=None, help="variant preset (default: custom)")
    casing = s.add_mutually_exclusive_group()
    casing.add_argument("--lowercase", action="store_true", help="force an uncased tokenizer")
    casing.add_argument("--cased", action="store_true", help="force a cased tokenizer")
    s.add_argument("--revision", default=None, help="hub revision (branch, tag or commit)")
    s.add_argument("--out", required=True, help="output dir")
    s.set_defaults(func=_prepare)

    s = sub.add_parser("inspect", help="show what a model dir holds")
    s.add_argument("path", help="model dir (prepared or a raw checkpoint)")
    s.add_argument("--json", action="store_true", help="print everything as JSON")
    s.set_defaults(func=_inspect)

    s = sub.add_parser("demo-data", help="write the synthetic demo corpus and small models")
    s.add_argument("--out", default="out/demo",
                   help="dir for corpus/, model/, readmission/ and deid/")  # fmt: skip
    s.add_argument("--notes", type=int, default=400, help="synthetic notes to write")
    s.add_argument("--hidden", type=int, default=128, help="hidden size of the random BERT")
    s.add_argument("--layers", type=int, default=2, help="layers of the random BERT")
    s.add_argument("--seed", type=int, default=0, help="random seed")
    s.set_defaults(func=_demo_data)

    s = sub.add_parser(
        "bench", help="encoder vs transformers benchmark (see --help)", add_help=False
    )
    s.set_defaults(func=_bench)


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else argv
    parser = build_parser()
    args, rest = parser.parse_known_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if args.command == "bench":
        return args.func(args, rest)
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    try:
        return args.func(args)
    except BrokenPipeError:  # `clinicalbert inspect DIR | head`: the reader has what it wanted
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no error at exit
        return 141  # as a shell reports a command its pipe closed on (128 + SIGPIPE)
    except (ValueError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except OSError as e:  # storage: a missing mount, an unreachable s3:// bucket, ...
        print(f"error: {describe(e)}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("error: interrupted; the shards committed so far are kept and counted in "
              "_report.json (interrupted: true); run again to resume", file=sys.stderr)  # fmt: skip
        return 130
    except Exception as e:  # the Ray cluster itself went away (GCS, object store); a dead
        # local raylet is NodeLost, already handled in _run
        if not type(e).__module__.startswith("ray"):
            raise
        print(f"error: lost the Ray cluster ({describe(e)}); committed "
              "shards are kept, run again to resume", file=sys.stderr)  # fmt: skip
        return 3
