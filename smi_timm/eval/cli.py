"""``smi-eval``: kNN and linear-probe evaluation of frozen backbones.

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
package). Each run writes one JSON (``--out``) and prints one markdown table row (appended
to ``--table`` with a header when the file is new), so a transfer table is built by running the command per data set.
kNN always reports ``k=20`` next to ``--k``. ``transfer`` (:func:`smi_timm.eval.transfer.run_transfer`) evaluates
one or more backbones by kNN (every ``--k``) and the linear probe at every ``--image-sizes`` entry in one command,
with one JSON (``{"backbones": [...]}``) and one table.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any, Dict, Optional, Sequence, Tuple

import torch
from torch import nn

from ..layout import write_json_atomic
from ..resolve import ResolvedBackbone, resolve_backbone
from .features import DataSpec, FeaturePair, data_label, data_list, extract_pair, feature_cache_key

__all__ = ["main", "run_knn", "run_linear", "load_backbone", "TABLE_HEADER"]

TABLE_HEADER = ("| model | weights | train | test | eval | top-1 | top-5 | notes |\n"
                "|---|---|---|---|---|---:|---:|---|\n")


def load_backbone(weights: str = "random", model: Optional[str] = None, cifar_stem: bool = False,
                  image_size: Optional[int] = None, weights_file: Optional[str] = None, seed: int = 0,
                  timm_kwargs: Optional[Dict[str, Any]] = None) -> Tuple[nn.Module, Dict[str, Any]]:
    """``(backbone in eval mode, info)`` for ``weights`` (see the module doc and
    :func:`smi_timm.resolve.resolve_backbone`); ``info`` has ``model``, ``weights``, ``weights_sha256``,
    ``cifar_stem``, ``image_size``, ``mean``, ``std``, ``crop_pct`` (None = the loader's default), ``num_features``."""
    resolved = resolve_backbone(weights, model=model, cifar_stem=cifar_stem, timm_kwargs=timm_kwargs,
                                weights_file=weights_file, seed=seed)
    return resolved.backbone.eval(), resolved.describe(image_size)


def _default_device(device: Optional[str]) -> torch.device:
    if device:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _extraction(resolved: ResolvedBackbone, info: Dict[str, Any], train: DataSpec, test: DataSpec, *, flip: bool,
                batch_size: int, workers: int, amp: str, device: torch.device, max_batches: Optional[int],
                progress: bool, cache_dir: Optional[str]) -> Dict[str, Any]:
    """Keyword arguments of :func:`extract_pair` / :func:`knn_evaluate` for a resolved backbone, with its cache key."""
    key = feature_cache_key(weights=info["weights_sha256"] or info["weights"], model=info["model"],
                            cifar_stem=info["cifar_stem"], train=data_list(train), test=data_list(test),
                            image_size=info["image_size"], flip=flip, amp=amp, max_batches=max_batches,
                            mean=info.get("mean"), std=info.get("std"), crop_pct=info.get("crop_pct"))
    return dict(image_size=info["image_size"], batch_size=batch_size, workers=workers, mean=info["mean"],
                std=info["std"], crop_pct=info["crop_pct"], device=device, amp=amp, max_batches=max_batches,
                progress=progress, cache_key=key, cache_dir=cache_dir,
                metadata={"model": str(info["model"]), "weights": str(info["weights"])})


def _fmt(x: Optional[float]) -> str:
    return "" if x is None else f"{x:.2f}"


def _table_row(result: Dict[str, Any]) -> str:
    model = result["model"] + (" (CIFAR stem)" if result.get("cifar_stem") else "")
    weights = result["weights"]
    if result.get("weights_sha256"):
        weights += f" `{result['weights_sha256'][:8]}`"
    return (f"| {model} | {weights} | {result['train_label']} | {result['test_label']} | {result['eval']} | "
            f"{_fmt(result['top1'])} | {_fmt(result['top5'])} | {result.get('notes', '')} |")


def _finish(result: Dict[str, Any], out: Optional[str], table: Optional[str], quiet: bool = False) -> Dict[str, Any]:
    row = _table_row(result)
    result["table_row"] = row
    if out:
        write_json_atomic(out, result, sort_keys=False)
    if table:
        table_path = Path(table)
        new = not table_path.exists() or table_path.stat().st_size == 0
        table_path.parent.mkdir(parents=True, exist_ok=True)
        with open(table_path, "a", encoding="utf-8") as f:
            f.write((TABLE_HEADER if new else "") + row + "\n")
    if not quiet:
        print(TABLE_HEADER + row)
    return result


def _base_result(task: str, info: Dict[str, Any], train: DataSpec, test: DataSpec, pair: FeaturePair, device,
                 amp) -> Dict[str, Any]:
    import timm

    from .. import __version__

    return {
        "task": task,
        "model": info["model"],
        "weights": info["weights"],
        "weights_sha256": info["weights_sha256"],
        "cifar_stem": info["cifar_stem"],
        "image_size": info["image_size"],
        "num_features": int(pair.bank.shape[1]),
        "train": data_list(train),
        "test": data_list(test),
        "train_label": data_label(train),
        "test_label": data_label(test),
        "num_train": int(pair.bank.shape[0]),
        "num_test": int(pair.query.shape[0]),
        "num_classes": pair.num_classes,
        "features_cached": pair.cached,
        "device": str(device),
        "amp": amp,
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "versions": {"smi_timm": __version__, "torch": torch.__version__, "timm": timm.__version__,
                     "python": platform.python_version()},
    }


def _prepare(task: str, weights: str, train: DataSpec, test: DataSpec, *, model, cifar_stem, image_size,
             weights_file, seed, timm_kwargs, device, flip=False, **extraction):
    """Resolve the backbone and the extraction settings shared by :func:`run_knn` and :func:`run_linear`."""
    if not train or not test:
        raise ValueError(f"{task} needs train= and test= data (shard patterns or ImageFolder dirs)")
    resolved = resolve_backbone(weights, model=model, cifar_stem=cifar_stem, timm_kwargs=timm_kwargs,
                                weights_file=weights_file, seed=seed)
    info = resolved.describe(image_size)
    dev = _default_device(device)
    return resolved.backbone.eval(), info, dev, _extraction(resolved, info, train, test, flip=flip, device=dev,
                                                            **extraction)


# ---------------------------------------------------------------------------------------------------------------------
# public API
# ---------------------------------------------------------------------------------------------------------------------

def run_knn(weights: str = "random", train: DataSpec = (), test: DataSpec = (), *, model: Optional[str] = None,
            cifar_stem: bool = False, image_size: Optional[int] = None, weights_file: Optional[str] = None,
            k: int = 200, T: float = 0.1, extra_k: Sequence[int] = (20,), batch_size: int = 256, workers: int = 2,
            amp: str = "no", device: Optional[str] = None, seed: int = 0, timm_kwargs: Optional[Dict] = None,
            cache_dir: Optional[str] = None, max_batches: Optional[int] = None, out: Optional[str] = None,
            table: Optional[str] = None, progress: bool = True, quiet: bool = False) -> Dict[str, Any]:
    """Weighted kNN (``k``, ``T``; also every ``extra_k``) of ``test`` against the ``train`` bank. Returns the result
    dict (also written to ``out`` as JSON, and as a markdown row to ``table``)."""
    from .knn import knn_evaluate

    t_start = time.perf_counter()
    backbone, info, dev, kwargs = _prepare(
        "run_knn", weights, train, test, model=model, cifar_stem=cifar_stem, image_size=image_size,
        weights_file=weights_file, seed=seed, timm_kwargs=timm_kwargs, device=device, batch_size=batch_size,
        workers=workers, amp=amp, max_batches=max_batches, progress=progress, cache_dir=cache_dir)
    ks = [int(k), *[int(e) for e in extra_k if int(e) != int(k)]]
    res = knn_evaluate(backbone, train, test, ks=ks, T=T, **kwargs)
    accs = res.accuracy
    times = dict(res.features.times, knn_s=res.seconds, total_s=time.perf_counter() - t_start)
    result = _base_result("knn", info, train, test, res.features, dev, amp)
    result.update(k=int(k), T=float(T), top1=accs[int(k)]["top1"], top5=accs[int(k)]["top5"],
                  results={f"k={kk}": accs[kk] for kk in ks}, times=times,
                  eval=f"kNN k={int(k)}, T={T:g}",
                  notes="; ".join(f"k={kk}: {accs[kk]['top1']:.2f} / {accs[kk]['top5']:.2f}" for kk in ks[1:]))
    return _finish(result, out, table, quiet)


def run_linear(weights: str = "random", train: DataSpec = (), test: DataSpec = (), *, model: Optional[str] = None,
               cifar_stem: bool = False, image_size: Optional[int] = None, weights_file: Optional[str] = None,
               epochs: int = 100, lr: float = 0.1, wd: float = 1e-4, probe_batch_size: int = 256, flip: bool = False,
               batch_size: int = 256, workers: int = 2, amp: str = "no", device: Optional[str] = None, seed: int = 0,
               timm_kwargs: Optional[Dict] = None, cache_dir: Optional[str] = None, max_batches: Optional[int] = None,
               out: Optional[str] = None, table: Optional[str] = None, progress: bool = True,
               quiet: bool = False) -> Dict[str, Any]:
    """Linear probe (see :mod:`smi_timm.eval.linear`) on frozen features of ``train``, evaluated on ``test``."""
    from .linear import train_linear_probe

    t_start = time.perf_counter()
    backbone, info, dev, kwargs = _prepare(
        "run_linear", weights, train, test, model=model, cifar_stem=cifar_stem, image_size=image_size,
        weights_file=weights_file, seed=seed, timm_kwargs=timm_kwargs, device=device, flip=flip,
        batch_size=batch_size, workers=workers, amp=amp, max_batches=max_batches, progress=progress,
        cache_dir=cache_dir)
    pair = extract_pair(backbone, train, test, flip=flip, **kwargs)
    t0 = time.perf_counter()
    accs = train_linear_probe(*pair.tensors(), epochs=epochs, lr=lr, weight_decay=wd, batch_size=probe_batch_size,
                              seed=seed, progress=progress, device=dev)
    times = dict(pair.times, probe_s=time.perf_counter() - t0, total_s=time.perf_counter() - t_start)
    result = _base_result("linear", info, train, test, pair, dev, amp)
    result.update(top1=accs["top1"], top5=accs["top5"], train_top1=accs["train_top1"], train_loss=accs["train_loss"],
                  epochs=epochs, lr=lr, wd=wd, probe_batch_size=probe_batch_size, flip=flip, times=times,
                  eval=f"linear {epochs} ep" + (", flip" if flip else ""),
                  notes=f"lr {lr:g}, wd {wd:g}, batch {probe_batch_size}")
    return _finish(result, out, table, quiet)


# ---------------------------------------------------------------------------------------------------------------------
# command line
# ---------------------------------------------------------------------------------------------------------------------

def _add_common(p: argparse.ArgumentParser, several: bool = False) -> None:
    p.add_argument("--weights", required=True, action="append" if several else "store",
                   help="'random', an export folder, a run dir / checkpoint, a .safetensors file (with --model), or "
                        "'timm:NAME' (with --weights-file)" + ("; repeat it to evaluate several backbones" if several
                                                              else ""))
    p.add_argument("--model", help="timm architecture (needed for --weights random or a bare .safetensors file)")
    p.add_argument("--weights-file", help="local .safetensors file for --weights timm:NAME")
    p.add_argument("--train", action="append", required=True,
                   help="training/bank data: WebDataset shard pattern(s) or an ImageFolder dir (repeatable); "
                        "sample:train = the bundled CIFAR-10 sample")
    p.add_argument("--test", action="append", required=True, help="test data, same forms as --train")
    p.add_argument("--image-size", type=int, help="input size (default: from the export/run, else 32 with "
                                                  "--cifar-stem, else the model's default)")
    p.add_argument("--cifar-stem", action="store_true", help="ResNet with the 3x3 stride-1 CIFAR stem")
    p.add_argument("--timm-kwargs", type=json.loads, default=None,
                   help='extra timm.create_model kwargs as JSON, e.g. \'{"img_size": 32, "patch_size": 4}\'')
    p.add_argument("--batch-size", type=int, default=256, help="feature-extraction batch size (default 256)")
    p.add_argument("--workers", type=int, default=min(4, os.cpu_count() or 1), help="data-loading workers")
    p.add_argument("--amp", choices=("no", "bf16", "fp16"), default="no", help="autocast during extraction")
    p.add_argument("--device", help="cuda / cpu (default: cuda when available)")
    p.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice; 1 is often fastest on a "
                                                "busy shared machine)")
    p.add_argument("--seed", type=int, default=0, help="seed of --weights random and of the linear probe")
    p.add_argument("--cache-dir", help="cache extracted features here (safetensors, keyed by weights+data+size)")
    p.add_argument("--max-batches", type=int, help="use only the first N batches of each split (quick checks)")
    p.add_argument("--out", help="write the result JSON here")
    p.add_argument("--table", help="append the markdown row to this file (header added when new)")
    p.add_argument("--no-progress", action="store_true", help="no progress bars")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="smi-eval", description="Evaluate frozen backbones with kNN or a linear "
                                                                  "probe.")
    sub = parser.add_subparsers(dest="command", required=True)
    knn = sub.add_parser("knn", help="weighted kNN (InstDisc/DINO style); also reports k=20")
    _add_common(knn)
    knn.add_argument("--k", type=int, default=200, help="neighbours (default 200)")
    knn.add_argument("--T", type=float, default=0.1, help="temperature of the exp(sim/T) votes (default 0.1)")
    lin = sub.add_parser("linear", help="linear probe on frozen, standardised features")
    _add_common(lin)
    lin.add_argument("--epochs", type=int, default=100)
    lin.add_argument("--lr", type=float, default=0.1, help="peak SGD learning rate (cosine to 0)")
    lin.add_argument("--wd", type=float, default=1e-4, help="weight decay on the linear weights")
    lin.add_argument("--probe-batch-size", type=int, default=256, help="linear-probe mini-batch size")
    lin.add_argument("--flip", action="store_true", help="add the features of flipped training images")
    tr = sub.add_parser("transfer", help="frozen backbones on a labelled set: kNN (several k) and the linear probe "
                                         "at several input sizes, one table")
    _add_common(tr, several=True)
    tr.add_argument("--image-sizes", nargs="+", default=["native", "64"],
                    help="input sizes; 'native' = the backbone's own (e.g. its pretraining size) (default: native 64)")
    tr.add_argument("--k", type=int, nargs="+", default=[20, 5], help="kNN neighbours (default 20 5)")
    tr.add_argument("--T", type=float, default=0.1, help="kNN temperature (default 0.1)")
    tr.add_argument("--epochs", type=int, default=100, help="linear-probe epochs (default 100)")
    tr.add_argument("--lr", type=float, default=0.1, help="linear-probe peak SGD learning rate")
    tr.add_argument("--wd", type=float, default=1e-4, help="linear-probe weight decay")
    tr.add_argument("--probe-batch-size", type=int, default=256, help="linear-probe mini-batch size")
    tr.add_argument("--flip", action="store_true", help="add the features of flipped training images to the probe")
    return parser


def main(argv: Optional[Sequence[str]] = None) -> int:
    from ..models.hub import WeightsHashError
    from ..models.registry import WeightsMismatchError

    args = build_parser().parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    common = dict(weights=args.weights, train=args.train, test=args.test, model=args.model,
                  cifar_stem=args.cifar_stem, image_size=args.image_size, weights_file=args.weights_file,
                  batch_size=args.batch_size, workers=args.workers, amp=args.amp, device=args.device, seed=args.seed,
                  timm_kwargs=args.timm_kwargs, cache_dir=args.cache_dir, max_batches=args.max_batches, out=args.out,
                  table=args.table, progress=not args.no_progress)
    if args.command == "transfer":
        return _transfer_main(args, common)
    try:
        if args.command == "knn":
            result = run_knn(k=args.k, T=args.T, **common)
        else:
            result = run_linear(epochs=args.epochs, lr=args.lr, wd=args.wd, probe_batch_size=args.probe_batch_size,
                                flip=args.flip, **common)
    except (FileNotFoundError, ValueError, WeightsMismatchError, WeightsHashError) as err:
        print(f"smi-eval: error: {err}", file=sys.stderr)
        return 2
    if args.out:
        print(f"wrote {args.out}", file=sys.stderr)
    return 0 if result else 1


def _transfer_main(args, common: Dict[str, Any]) -> int:
    from ..models.hub import WeightsHashError
    from ..models.registry import WeightsMismatchError
    from .transfer import TRANSFER_HEADER, parse_image_sizes, run_transfer

    out, table, size = common.pop("out"), common.pop("table"), common.pop("image_size")
    results = []
    try:
        sizes = parse_image_sizes(args.image_sizes if size is None else [size])  # --image-size N: one size
        for weights in common.pop("weights"):
            results.append(run_transfer(weights, image_sizes=sizes, ks=args.k, T=args.T, epochs=args.epochs, lr=args.lr,
                                        wd=args.wd, probe_batch_size=args.probe_batch_size, flip=args.flip,
                                        table=table, quiet=True, **common))
    except (FileNotFoundError, ValueError, WeightsMismatchError, WeightsHashError) as err:
        print(f"smi-eval: error: {err}", file=sys.stderr)
        return 2
    print(TRANSFER_HEADER + "\n".join(row for r in results for row in r["table_rows"]))
    if out:
        write_json_atomic(out, {"task": "transfer", "backbones": results}, sort_keys=False)
        print(f"wrote {out}", file=sys.stderr)
    return 0


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
