"""``smi-eval``: kNN, linear-probe and transfer evaluation of frozen backbones.

::

    smi-eval knn    --weights W --train 'train-{000000..000004}.tar.gz' --test 'test-000000.tar.gz' [--out r.json]
    smi-eval linear --weights W --train ... --test ... [--epochs 100 --lr 0.1 --wd 1e-4 --flip --cache-dir DIR]
    smi-eval transfer --weights W [--weights W2 ...] --train ... --test ... [--image-sizes native 64 --k 20 5]

``--weights`` is one of

* ``random`` — a randomly initialised ``--model`` (seeded by ``--seed``): the floor any pretraining must beat;
* an export folder written by ``smi-export`` (``config.json`` + ``model.safetensors``): model, stem, image size and
  normalisation come from its config;
* a run directory (its latest complete checkpoint) or a checkpoint folder / ``model.safetensors`` of a run: settings
  from the run's ``run_config.json``;
* a ``.safetensors`` file with backbone (or full ``SSLModel``) weights, with ``--model`` [``--cifar-stem``];
* ``timm:NAME`` with ``--weights-file F.safetensors``: any timm architecture with a local weights file (offline).

(:func:`smi_timm.resolve.resolve_backbone` builds all of them.)

``--train``/``--test`` take WebDataset shard patterns (``.tar``/``.tar.gz``, brace ranges, repeat the flag for
several), ImageFolder directories, or ``sample:train`` / ``sample:test`` (the CIFAR-10 sample bundled with the
package). Each run writes one JSON (``--out``) and prints one markdown table row (appended to ``--table`` with a
header when the file is new), so a transfer table is built by running the command per data set. kNN always reports
``k=20`` next to ``--k``. ``transfer`` (:func:`smi_timm.eval.transfer.run_transfer`) evaluates one or more backbones
by kNN (every ``--k``) and the linear probe at every ``--image-sizes`` entry in one command, with one JSON
(``{"backbones": [...]}``) and one table.

The evaluation itself is :mod:`smi_timm.eval.run` (settings: :class:`smi_timm.eval.settings.EvalSettings`); this
module parses flags, prints and writes files.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence

from ..eval.report import TABLE_HEADER, TRANSFER_HEADER, table_row
from ..eval.run import run_knn, run_linear
from ..eval.transfer import parse_image_sizes, run_transfer
from ..layout import write_json_atomic
from .args import add_backbone_args, add_extraction_args, add_probe_args, apply_threads, backbone_source, eval_settings
from .common import run_cli

__all__ = ["main", "build_parser", "append_rows"]

PROG = "smi-eval"


def append_rows(table: str, header: str, rows: List[str]) -> None:
    """Append markdown ``rows`` to the file ``table`` (with ``header`` when the file is new or empty)."""
    path = Path(table)
    new = not path.exists() or path.stat().st_size == 0
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path, "a", encoding="utf-8") as f:
        f.write((header if new else "") + "\n".join(rows) + "\n")


def _add_data_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--train", action="append", required=True,
                   help="training/bank data: WebDataset shard pattern(s) or an ImageFolder dir (repeatable); "
                        "sample:train = the bundled CIFAR-10 sample")
    p.add_argument("--test", action="append", required=True, help="test data, same forms as --train")
    p.add_argument("--label-key", help="read labels from this field of each sample's json entry (default: cls)")
    p.add_argument("--classes", dest="classes_file",
                   help="class names, one per line (line i = class i), for labels given as names (default: the "
                        "data's own: the shard index, a classes.txt next to the shards, or the class folders)")
    p.add_argument("--cache-dir", help="cache extracted features here (safetensors, keyed by weights+data+size)")
    p.add_argument("--max-batches", type=int, help="use only the first N batches of each split (quick checks)")
    p.add_argument("--out", help="write the result JSON here")
    p.add_argument("--table", help="append the markdown row(s) to this file (header added when new)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog=PROG, description="Evaluate frozen backbones with kNN or a linear probe.")
    sub = parser.add_subparsers(dest="command", required=True)
    knn = sub.add_parser("knn", help="weighted kNN (InstDisc/DINO style); also reports k=20")
    knn.add_argument("--k", type=int, default=200, help="neighbours (default 200)")
    knn.add_argument("--T", type=float, default=0.1, help="temperature of the exp(sim/T) votes (default 0.1)")
    lin = sub.add_parser("linear", help="linear probe on frozen, standardised features")
    add_probe_args(lin)
    tr = sub.add_parser("transfer", help="frozen backbones on a labelled set: kNN (several k) and the linear probe "
                                         "at several input sizes, one table")
    tr.add_argument("--image-sizes", nargs="+", default=["native", "64"],
                    help="input sizes; 'native' = the backbone's own (e.g. its pretraining size) (default: native 64)")
    tr.add_argument("--k", type=int, nargs="+", default=[20, 5], help="kNN neighbours (default 20 5)")
    tr.add_argument("--T", type=float, default=0.1, help="kNN temperature (default 0.1)")
    add_probe_args(tr)
    for p, several in ((knn, False), (lin, False), (tr, True)):
        add_backbone_args(p, several=several)
        _add_data_args(p)
        add_extraction_args(p)
    return parser


def _report_data(result: Dict[str, Any]) -> None:
    """What each split's loader read, evaluated and dropped (and why), on stderr."""
    for split, d in (result.get("data") or {}).items():
        dropped = ", ".join(f"{n} {k.replace('_', ' ')}" for k, n in d["dropped"].items())
        print(f"{split}: read {d['read']} samples, evaluated {d['evaluated']}"
              + (f", dropped {sum(d['dropped'].values())} ({dropped})" if dropped else ""), file=sys.stderr)


def _write(result: Dict[str, Any], args) -> None:
    _report_data(result)
    row = table_row(result)
    result["table_row"] = row
    if args.out:
        write_json_atomic(args.out, result, sort_keys=False)
    if args.table:
        append_rows(args.table, TABLE_HEADER, [row])
    print(TABLE_HEADER + row)
    if args.out:
        print(f"wrote {args.out}", file=sys.stderr)


def _knn_or_linear(args) -> int:
    source = backbone_source(args)
    if args.command == "knn":
        result = run_knn(source, args.train, args.test, eval_settings(args, k=args.k))
    else:
        result = run_linear(source, args.train, args.test, eval_settings(args))
    _write(result, args)
    return 0


def _transfer(args) -> int:
    sizes = parse_image_sizes(args.image_sizes if args.image_size is None else [args.image_size])
    settings = eval_settings(args, image_size=None, k=args.k[0], extra_k=tuple(args.k[1:]))
    results = [run_transfer(backbone_source(args, w), args.train, args.test, settings, image_sizes=sizes)
               for w in args.weights]
    for r in results[:1]:
        _report_data(r)
    rows = [row for r in results for row in r["table_rows"]]
    if args.table:
        append_rows(args.table, TRANSFER_HEADER, rows)
    print(TRANSFER_HEADER + "\n".join(rows))
    if args.out:
        write_json_atomic(args.out, {"task": "transfer", "backbones": results}, sort_keys=False)
        print(f"wrote {args.out}", file=sys.stderr)
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    apply_threads(args)
    return run_cli(PROG, lambda: _transfer(args) if args.command == "transfer" else _knn_or_linear(args))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
