"""`clinicalbert` / `python -m jobs`: run, validate, schema, prepare, inspect, bench, demo-data."""

from __future__ import annotations

import argparse
import json
import logging
import os
import sys
from pathlib import Path


def _prepare(args: argparse.Namespace) -> int:
    from clinicalbert_core.hub import prepare

    lowercase = True if args.lowercase else False if args.cased else None
    out = prepare(args.source, args.out, variant=args.variant, lowercase=lowercase,
                  revision=args.revision)  # fmt: skip
    print(f"prepared {out}")
    return 0


def _inspect(args: argparse.Namespace) -> int:
    from clinicalbert_core.hub import inspect

    info = inspect(args.path)
    if args.json:
        print(json.dumps(info, indent=2))
        return 0
    c = info["config"]
    casing = {True: "uncased (lowercase)", False: "cased", None: "unknown"}[info["lowercase"]]
    heads = ", ".join(k for k, v in info["heads"].items() if v) or "none"
    print(f"{info['path']}")
    print(f"  variant     {info['variant'] or '(not prepared)'}")
    print(f"  source      {json.dumps(info['source']) if info['source'] else '-'}")
    print(f"  shape       vocab {c['vocab_size']}, hidden {c['hidden_size']}, layers "
          f"{c['num_hidden_layers']}, heads {c['num_attention_heads']}, ffn {c['intermediate_size']}, "
          f"positions {c['max_position_embeddings']}")  # fmt: skip
    print(f"  casing      {casing}")
    print(f"  heads       {heads}")
    print(f"  parameters  {info['parameters']:,}")
    for name, digest in info["sha256"].items():
        print(f"  sha256      {digest}  {name}")
    return 0


def _demo_data(args: argparse.Namespace) -> int:
    from clinicalbert_core.hub import prepare

    from .synthetic import make_model, write_corpus

    root = Path(args.out)
    corpus = write_corpus(root / "corpus" / "notes.parquet", args.notes, seed=args.seed)
    raw = make_model(root / "raw_model", hidden=args.hidden, layers=args.layers, seed=args.seed)
    model = prepare(raw, root / "model", variant="custom", lowercase=False)
    print(f"demo corpus {corpus} ({args.notes} notes), model {model}")
    return 0


def _bench(args: argparse.Namespace, rest: list[str]) -> int:
    from .bench import main as bench_main

    return bench_main(rest)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="clinicalbert", description=__doc__)
    p.add_argument("-v", "--verbose", action="store_true", help="debug logging")
    sub = p.add_subparsers(dest="command", required=True)

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
    s.add_argument("path")
    s.add_argument("--json", action="store_true")
    s.set_defaults(func=_inspect)

    s = sub.add_parser("demo-data", help="write the synthetic demo corpus and a small model")
    s.add_argument("--out", default="out/demo")
    s.add_argument("--notes", type=int, default=400)
    s.add_argument("--hidden", type=int, default=128)
    s.add_argument("--layers", type=int, default=2)
    s.add_argument("--seed", type=int, default=0)
    s.set_defaults(func=_demo_data)

    s = sub.add_parser(
        "bench", help="encoder vs transformers benchmark (see --help)", add_help=False
    )
    s.set_defaults(func=_bench)
    return p


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
    except (ValueError, RuntimeError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
