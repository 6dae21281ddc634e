"""``smi-eval``: kNN and linear-probe evaluation of frozen backbones.

::

    smi-eval knn    --weights W --train 'train-{000000..000004}.tar.gz' --test 'test-000000.tar.gz' [--out r.json]
    smi-eval linear --weights W --train ... --test ... [--epochs 100 --lr 0.1 --wd 1e-4 --flip --cache-dir DIR]

``--weights`` is one of

* ``random`` — a randomly initialised ``--model`` (seeded by ``--seed``): the floor any pretraining must beat;
* an export folder written by ``smi-export`` (``config.json`` + ``model.safetensors``): model, stem, image size and
  normalisation come from its config;
* a run directory (its latest complete checkpoint) or a checkpoint folder / ``model.safetensors`` of a run: settings
  from the run's ``run_config.json``;
* a ``.safetensors`` file with backbone (or full ``SSLModel``) weights, with ``--model`` [``--cifar-stem``];
* ``timm:NAME`` with ``--weights-file F.safetensors``: any timm architecture with a local weights file (offline).

``--train``/``--test`` take WebDataset shard patterns (``.tar``/``.tar.gz``, brace ranges, repeat the flag for
several), ImageFolder directories, or ``sample:train`` / ``sample:test`` (the CIFAR-10 sample bundled with the
package). Each run writes one JSON (``--out``) and prints one markdown table row (appended
to ``--table`` with a header when the file is new), so a transfer table is built by running the command per data set.
kNN always reports ``k=20`` next to ``--k``.
"""
from __future__ import annotations

import argparse
import datetime as _dt
import inspect
import json
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any, Dict, List, Optional, Sequence, Tuple, Union

import torch
from torch import nn

__all__ = ["main", "run_knn", "run_linear", "load_backbone", "TABLE_HEADER"]

TABLE_HEADER = ("| model | weights | train | test | eval | top-1 | top-5 | notes |\n"
                "|---|---|---|---|---|---:|---:|---|\n")
DataSpec = Union[str, os.PathLike, Sequence[Union[str, os.PathLike]]]


# ---------------------------------------------------------------------------------------------------------------------
# backbones
# ---------------------------------------------------------------------------------------------------------------------

def _create_backbone(model: str, cifar_stem: bool, timm_kwargs: Optional[Dict[str, Any]]) -> nn.Module:
    import timm

    from ..models.ssl import apply_cifar_stem

    if not timm.is_model(model):
        raise ValueError(f"unknown timm model {model!r}; see timm.list_models() (smi names need `import smi_timm`)")
    kwargs = dict(timm_kwargs or {})
    kwargs.pop("num_classes", None)
    backbone = timm.create_model(model, pretrained=False, num_classes=0, **kwargs)
    if cifar_stem:
        apply_cifar_stem(backbone)
    return backbone


def _load_checked(backbone: nn.Module, state: Dict[str, torch.Tensor], name: str) -> None:
    from ..models.registry import check_state_dict, strip_ssl_prefix

    state = strip_ssl_prefix(state)
    classifier = (backbone.pretrained_cfg or {}).get("classifier") if hasattr(backbone, "pretrained_cfg") else None
    names = ((classifier,) if isinstance(classifier, str) else tuple(classifier or ()))
    ignore = [f"{c}.{p}" for c in names for p in ("weight", "bias")]
    state = {k: v for k, v in state.items() if k not in ignore}
    check_state_dict(state, backbone, name=name, ignore=ignore)
    backbone.load_state_dict(state, strict=False)


def _default_image_size(backbone: nn.Module, cifar_stem: bool) -> int:
    if cifar_stem:
        return 32
    cfg = getattr(backbone, "pretrained_cfg", None) or {}
    return int(cfg.get("input_size", (3, 224, 224))[-1])


def load_backbone(weights: str = "random", model: Optional[str] = None, cifar_stem: bool = False,
                  image_size: Optional[int] = None, weights_file: Optional[str] = None, seed: int = 0,
                  timm_kwargs: Optional[Dict[str, Any]] = None) -> Tuple[nn.Module, Dict[str, Any]]:
    """Build the backbone named by ``weights`` (see the module doc) and describe it.

    Returns:
        ``(backbone, info)``; ``info`` has ``model``, ``weights``, ``weights_sha256``, ``cifar_stem``,
        ``image_size``, ``mean``, ``std`` and ``crop_pct`` (None = the loader's default).
    """
    from ..export import CONFIG_NAME, WEIGHTS_NAME, _resolve_export_source, load_export
    from ..models.hub import load_safetensors, resolve_weights, sha256_file

    weights = str(weights)
    info: Dict[str, Any] = {"weights": weights, "weights_sha256": None, "crop_pct": None, "mean": None, "std": None}
    path = Path(weights)
    if weights == "random":
        if not model:
            raise ValueError("--weights random needs --model (the timm architecture to initialise)")
        torch.manual_seed(seed)
        backbone = _create_backbone(model, cifar_stem, timm_kwargs)
        info.update(model=model, cifar_stem=cifar_stem, weights=f"random (seed {seed})")
    elif weights.startswith("timm:"):
        name = weights[len("timm:"):]
        if not weights_file:
            raise ValueError(f"--weights {weights} needs --weights-file F.safetensors: loading {name}'s published "
                             f"weights would need the network; download the file once and pass it")
        file = resolve_weights(weights_file)
        backbone = _create_backbone(name, cifar_stem, timm_kwargs)
        _load_checked(backbone, load_safetensors(file), name)
        cfg = backbone.pretrained_cfg or {}
        info.update(model=name, cifar_stem=cifar_stem, weights_sha256=sha256_file(file), weights=f"timm:{name}",
                    mean=list(cfg.get("mean", ())) or None, std=list(cfg.get("std", ())) or None,
                    crop_pct=cfg.get("crop_pct"), weights_file=str(file))
    elif path.is_dir() and (path / CONFIG_NAME).is_file() and (path / WEIGHTS_NAME).is_file():
        backbone = load_export(path)
        with open(path / CONFIG_NAME, "r", encoding="utf-8") as f:
            config = json.load(f)
        smi = config.get("smi") or {}
        exported_model = smi.get("model") or config["architecture"]
        if model and model not in (exported_model, config["architecture"]):
            raise ValueError(f"--model {model} contradicts the export in {path} ({exported_model}); drop --model")
        pcfg = config.get("pretrained_cfg", {})
        info.update(model=exported_model, cifar_stem=bool(config.get("cifar_stem", False)),
                    weights_sha256=config.get("sha256"), mean=pcfg.get("mean"), std=pcfg.get("std"),
                    crop_pct=pcfg.get("crop_pct"))
        image_size = image_size or int(pcfg.get("input_size", (3, 224, 224))[-1])
    elif path.exists():
        if path.is_file() and path.suffix == ".safetensors" and model:
            file, run_config = path, {"model": model, "cifar_stem": cifar_stem, "timm_kwargs": timm_kwargs or {}}
        else:
            try:  # run dir / checkpoint dir / checkpoint file
                file, run_config = _resolve_export_source(path)
            except FileNotFoundError as err:
                raise FileNotFoundError(f"{err}; for a bare weights file pass --model NAME [--cifar-stem]") from None
            if model and model != run_config["model"]:
                raise ValueError(f"--model {model} contradicts the run config of {path} ({run_config['model']})")
        backbone = _create_backbone(run_config["model"], bool(run_config.get("cifar_stem")),
                                    run_config.get("timm_kwargs"))
        _load_checked(backbone, load_safetensors(file), run_config["model"])
        info.update(model=run_config["model"], cifar_stem=bool(run_config.get("cifar_stem")),
                    weights_sha256=sha256_file(file), weights=str(file), mean=run_config.get("mean"),
                    std=run_config.get("std"))
        image_size = image_size or run_config.get("image_size")
    else:
        raise FileNotFoundError(f"--weights {weights!r} is not 'random', 'timm:NAME', an existing export/run folder "
                                f"or a .safetensors file")
    info["image_size"] = int(image_size or _default_image_size(backbone, info["cifar_stem"]))
    info["num_features"] = int(getattr(backbone, "num_features", 0))
    return backbone.eval(), info


# ---------------------------------------------------------------------------------------------------------------------
# data and features
# ---------------------------------------------------------------------------------------------------------------------

def _as_list(spec: DataSpec) -> List[str]:
    if isinstance(spec, (str, os.PathLike)):
        return [os.fspath(spec)]
    return [os.fspath(s) for s in spec]


def _data_label(spec: DataSpec) -> str:
    items = _as_list(spec)
    if len(items) == 1 and items[0].startswith("sample:"):
        return items[0]
    first = items[0].rstrip("/\\")
    label = "/".join(Path(first).parts[-2:])
    return label + (f" (+{len(items) - 1})" if len(items) > 1 else "")


def expand_data_spec(spec: DataSpec) -> List[str]:
    """Data spec as a list; ``sample:train`` / ``sample:test`` name the CIFAR-10 sample bundled with the package."""
    items: List[str] = []
    for item in _as_list(spec):
        if item.startswith("sample:"):
            from ..data import sample_shards

            items.extend(str(p) for p in sample_shards(item[len("sample:"):]))
        else:
            items.append(item)
    return items


def _make_loader(spec: DataSpec, batch_size: int, image_size: int, workers: int, info: Dict[str, Any]):
    from ..data import make_eval_loader

    items = expand_data_spec(spec)
    urls: Union[str, List[str]] = items[0] if len(items) == 1 else items
    params = inspect.signature(make_eval_loader).parameters
    kwargs: Dict[str, Any] = {}
    if "num_workers" in params:
        kwargs["num_workers"] = workers
    for key in ("mean", "std", "crop_pct"):
        if info.get(key) is not None and key in params:
            kwargs[key] = tuple(info[key]) if key != "crop_pct" else float(info[key])
    return make_eval_loader(urls, batch_size=batch_size, image_size=image_size, **kwargs)


def _default_device(device: Optional[str]) -> torch.device:
    if device:
        return torch.device(device)
    return torch.device("cuda" if torch.cuda.is_available() else "cpu")


def _features(backbone: nn.Module, info: Dict[str, Any], train: DataSpec, test: DataSpec, *, batch_size: int,
              workers: int, amp: str, device: torch.device, flip: bool, progress: bool, cache_dir: Optional[str],
              max_batches: Optional[int], times: Dict[str, float]):
    from .features import extract_features
    from .linear import feature_cache_key, load_cached_features, save_cached_features

    key = feature_cache_key(weights=info["weights_sha256"] or info["weights"], model=info["model"],
                            cifar_stem=info["cifar_stem"], train=_as_list(train), test=_as_list(test),
                            image_size=info["image_size"], flip=flip, amp=amp, max_batches=max_batches,
                            mean=info.get("mean"), std=info.get("std"), crop_pct=info.get("crop_pct"))
    cached = load_cached_features(key, cache_dir)
    if cached is not None:
        times.update(extract_train_s=0.0, extract_test_s=0.0)
        return cached, True
    backbone.to(device)
    t0 = time.perf_counter()
    loader = _make_loader(train, batch_size, info["image_size"], workers, info)
    train_feats, train_labels = extract_features(backbone, loader, device=device, amp_dtype=amp, flip=flip,
                                                 max_batches=max_batches, progress=progress, desc="train features")
    t1 = time.perf_counter()
    loader = _make_loader(test, batch_size, info["image_size"], workers, info)
    test_feats, test_labels = extract_features(backbone, loader, device=device, amp_dtype=amp,
                                               max_batches=max_batches, progress=progress, desc="test features")
    times.update(extract_train_s=t1 - t0, extract_test_s=time.perf_counter() - t1)
    feats = (train_feats, train_labels, test_feats, test_labels)
    save_cached_features(key, feats, cache_dir, metadata={"model": str(info["model"]), "weights": str(info["weights"])})
    return feats, False


# ---------------------------------------------------------------------------------------------------------------------
# results
# ---------------------------------------------------------------------------------------------------------------------

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
    from ..export import _atomic_write

    row = _table_row(result)
    result["table_row"] = row
    if out:
        _atomic_write(Path(out), (json.dumps(result, indent=2, default=str) + "\n").encode("utf-8"))
    if table:
        table_path = Path(table)
        new = not table_path.exists() or table_path.stat().st_size == 0
        table_path.parent.mkdir(parents=True, exist_ok=True)
        with open(table_path, "a", encoding="utf-8") as f:
            f.write((TABLE_HEADER if new else "") + row + "\n")
    if not quiet:
        print(TABLE_HEADER + row)
    return result


def _base_result(task: str, info: Dict[str, Any], train: DataSpec, test: DataSpec, feats, device, amp,
                 image_size: int, cached: bool) -> Dict[str, Any]:
    import timm

    from .. import __version__

    return {
        "task": task,
        "model": info["model"],
        "weights": info["weights"],
        "weights_sha256": info["weights_sha256"],
        "cifar_stem": info["cifar_stem"],
        "image_size": image_size,
        "num_features": int(feats[0].shape[1]),
        "train": _as_list(train),
        "test": _as_list(test),
        "train_label": _data_label(train),
        "test_label": _data_label(test),
        "num_train": int(feats[0].shape[0]),
        "num_test": int(feats[2].shape[0]),
        "num_classes": int(max(feats[1].max().item(), feats[3].max().item())) + 1,
        "features_cached": cached,
        "device": str(device),
        "amp": amp,
        "date": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
        "versions": {"smi_timm": __version__, "torch": torch.__version__, "timm": timm.__version__,
                     "python": platform.python_version()},
    }


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
    from .knn import knn_classify_multi

    if not train or not test:
        raise ValueError("run_knn needs train= and test= data (shard patterns or ImageFolder dirs)")
    t_start = time.perf_counter()
    backbone, info = load_backbone(weights, model=model, cifar_stem=cifar_stem, image_size=image_size,
                                   weights_file=weights_file, seed=seed, timm_kwargs=timm_kwargs)
    dev = _default_device(device)
    times: Dict[str, float] = {}
    feats, cached = _features(backbone, info, train, test, batch_size=batch_size, workers=workers, amp=amp,
                              device=dev, flip=False, progress=progress, cache_dir=cache_dir,
                              max_batches=max_batches, times=times)
    t0 = time.perf_counter()
    ks = [int(k), *[int(e) for e in extra_k if int(e) != int(k)]]
    accs = knn_classify_multi(*feats, ks=ks, T=T, device=dev)
    times["knn_s"] = time.perf_counter() - t0
    times["total_s"] = time.perf_counter() - t_start
    result = _base_result("knn", info, train, test, feats, dev, amp, info["image_size"], cached)
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

    if not train or not test:
        raise ValueError("run_linear needs train= and test= data (shard patterns or ImageFolder dirs)")
    t_start = time.perf_counter()
    backbone, info = load_backbone(weights, model=model, cifar_stem=cifar_stem, image_size=image_size,
                                   weights_file=weights_file, seed=seed, timm_kwargs=timm_kwargs)
    dev = _default_device(device)
    times: Dict[str, float] = {}
    feats, cached = _features(backbone, info, train, test, batch_size=batch_size, workers=workers, amp=amp,
                              device=dev, flip=flip, progress=progress, cache_dir=cache_dir,
                              max_batches=max_batches, times=times)
    t0 = time.perf_counter()
    accs = train_linear_probe(*feats, epochs=epochs, lr=lr, weight_decay=wd, batch_size=probe_batch_size, seed=seed,
                              progress=progress, device=dev)
    times["probe_s"] = time.perf_counter() - t0
    times["total_s"] = time.perf_counter() - t_start
    result = _base_result("linear", info, train, test, feats, dev, amp, info["image_size"], cached)
    result.update(top1=accs["top1"], top5=accs["top5"], train_top1=accs["train_top1"], train_loss=accs["train_loss"],
                  epochs=epochs, lr=lr, wd=wd, probe_batch_size=probe_batch_size, flip=flip, times=times,
                  eval=f"linear {epochs} ep" + (", flip" if flip else ""),
                  notes=f"lr {lr:g}, wd {wd:g}, batch {probe_batch_size}")
    return _finish(result, out, table, quiet)


# ---------------------------------------------------------------------------------------------------------------------
# command line
# ---------------------------------------------------------------------------------------------------------------------

def _add_common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--weights", required=True,
                   help="'random', an export folder, a run dir / checkpoint, a .safetensors file (with --model), or "
                        "'timm:NAME' (with --weights-file)")
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


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
