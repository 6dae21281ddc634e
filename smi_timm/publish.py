"""Publishing an export on the Hugging Face Hub: the model card and the upload.

An export folder (``smi-export``) already has exactly what the Hub and ``timm.create_model('hf-hub:ORG/NAME')``
expect: ``model.safetensors`` and a ``config.json`` in timm's format. :func:`model_card` adds a ``README.md`` that
states the loss and its settings, the recipe, the data and the measured kNN / linear-probe numbers when they are known
(the run's online kNN monitor, and any ``smi-eval --out`` result files given); :func:`push_to_hub` uploads the folder
with ``huggingface_hub`` (installed with timm; the token comes from ``huggingface-cli login`` or ``HF_TOKEN``).
"""
from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any, Dict, Iterable, List, Optional, Sequence, Union

from .curves import read_metrics
from .errors import ConfigError
from .eval.report import TABLE_HEADER, table_row
from .layout import CONFIG_NAME, METRICS, MODEL_CARD, atomic_write_bytes, is_run_dir
from .losses import LOSSES

__all__ = ["model_card", "write_model_card", "push_to_hub"]

PathLike = Union[str, os.PathLike]

# recipe fields worth a line in the card, in this order
_RECIPE_KEYS = ("optimizer", "lr", "lr_biases", "weight_decay", "global_batch", "batch_size", "num_processes",
                "grad_accum", "total_steps", "steps_per_epoch", "warmup_steps", "mixed_precision", "augment",
                "image_size", "projector", "sync_bn", "init_from", "seed")


def _monitor_rows(run_dir: Optional[Path]) -> List[Dict[str, Any]]:
    if run_dir is None or not (run_dir / METRICS).is_file():
        return []
    rows, _ = read_metrics(run_dir / METRICS)
    return [r for r in rows if "knn_top1" in r]


def _results_section(run_dir: Optional[Path], recipe: Dict[str, Any], results: Sequence[Dict[str, Any]]) -> List[str]:
    lines: List[str] = []
    monitor = _monitor_rows(run_dir)
    if monitor:
        last = monitor[-1]
        lines += [f"- Online kNN monitor at step {last['step']} (k={recipe.get('eval_k', '?')}, T=0.1; bank "
                  f"`{' '.join(recipe.get('eval_train') or [])}`, queries `{' '.join(recipe.get('eval_test') or [])}`):"
                  f" top-1 {last['knn_top1']:.2f} %, top-5 {last['knn_top5']:.2f} %."]
    if results:
        lines += ["", "Frozen-backbone evaluations (`smi-eval`):", "", TABLE_HEADER.rstrip("\n")]
        lines += [r.get("table_row") or table_row(r) for r in results]  # as smi-eval wrote it, else formatted
    return lines or ["No evaluation was recorded with this export (run `smi-eval knn|linear ... --out r.json` and "
                     "pass the files with `--results`)."]


def model_card(out_dir: PathLike, repo_id: Optional[str] = None, run_dir: Optional[PathLike] = None,
               results: Iterable[Dict[str, Any]] = ()) -> str:
    """The ``README.md`` of an export folder: YAML metadata for the Hub, then loss, recipe, data, results, usage.

    Args:
        out_dir: the export folder (its ``config.json`` says everything about the model and the run).
        repo_id: ``ORG/NAME`` on the Hub, for the usage snippet (default: the folder name).
        run_dir: the run directory the export came from, for its online kNN monitor (default: the export's parent
            when that is a run directory, i.e. ``RUN_DIR/export``).
        results: ``smi-eval`` result dicts (``--out`` JSON files) measured on this export.
    """
    out = Path(out_dir)
    config = json.loads((out / CONFIG_NAME).read_text(encoding="utf-8"))
    smi = config.get("smi") or {}
    loss = dict(smi.get("loss") or {})
    recipe = dict(smi.get("recipe") or {})
    run = Path(run_dir) if run_dir is not None else (out.parent if is_run_dir(out.parent) else None)
    name = repo_id or out.name
    arch = config["architecture"]
    entry = LOSSES.get(loss.get("name", ""))
    loss_name = entry.display_name if entry else (loss.get("name") or "unknown")
    loss_summary = f" ({entry.summary.rstrip('.')})" if entry else ""
    settings = ", ".join(f"{k}={v}" for k, v in loss.items() if k != "name") or "defaults"
    at_step = "" if smi.get("step") is None else f" at step {smi['step']}"
    samples = f" ({recipe['epoch_samples']} samples per epoch)" if recipe.get("epoch_samples") else ""
    stem_note = ("The ResNet has a 3x3 stride-1 stem without max-pool (CIFAR stem): `import smi_timm` first, which "
                 "registers the `*_cifar` architectures with timm.\n\n" if config.get("cifar_stem") else "")
    lines = ["---", "library_name: timm", "pipeline_tag: image-feature-extraction",
             "tags:", "- image-feature-extraction", "- timm", "- self-supervised-learning", "- smi-timm",
             f"- {loss.get('name', 'ssl')}", "---", "",
             f"# {name}", "",
             f"A `{arch}` backbone pretrained without labels with the {loss_name} loss by smi-timm, "
             f"exported{at_step} (input {config['pretrained_cfg']['input_size'][-1]} px, "
             f"{config.get('num_features', '?')} features, no classifier).", "",
             "## Usage", "", "```python", "import timm" + (", smi_timm" if config.get("cifar_stem") else ""),
             f"backbone = timm.create_model('hf-hub:{name}', pretrained=True)  # pooled features", "```", "",
             stem_note + "## Pretraining", "",
             f"- Loss: {loss_name}{loss_summary}; settings: {settings}; projector {smi.get('projector') or 'none'} "
             f"(not included"
             f"{'' if not smi.get('projector_file') else ' in the backbone file; see projector.safetensors'}).",
             f"- Data: `{' '.join(recipe.get('data') or []) or 'unknown'}`{samples}.",
             "- Recipe: " + ", ".join(f"{k} {recipe[k]}" for k in _RECIPE_KEYS if recipe.get(k) is not None) + ".",
             f"- Weights sha256: `{config.get('sha256', '?')}`.", "", "## Results", ""]
    lines += _results_section(run, recipe, list(results))
    return "\n".join(lines).replace("\n\n\n", "\n\n") + "\n"


def write_model_card(out_dir: PathLike, **kwargs: Any) -> Path:
    """Write :func:`model_card` as ``OUT_DIR/README.md`` (atomically); returns its path."""
    path = Path(out_dir) / MODEL_CARD
    atomic_write_bytes(path, model_card(out_dir, **kwargs).encode("utf-8"))
    return path


def push_to_hub(out_dir: PathLike, repo_id: str, *, private: bool = False, token: Optional[str] = None,
                commit_message: Optional[str] = None, api: Any = None) -> str:
    """Create ``repo_id`` on the Hub (if needed) and upload the export folder (weights, config, model card).

    Returns the URL of the commit. ``api`` is a ``huggingface_hub.HfApi`` (default: a new one with ``token``).
    """
    if "/" not in repo_id:
        raise ConfigError(f"--push-to-hub needs ORG/NAME (or USER/NAME), got {repo_id!r}")
    if api is None:
        from huggingface_hub import HfApi

        api = HfApi(token=token)
    api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
    info = api.upload_folder(repo_id=repo_id, repo_type="model", folder_path=str(out_dir),
                             commit_message=commit_message or "Upload smi-timm export",
                             allow_patterns=["*.safetensors", CONFIG_NAME, MODEL_CARD])
    return str(getattr(info, "commit_url", info))
