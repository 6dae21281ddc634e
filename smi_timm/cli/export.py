"""``smi-export``: a run's backbone as a folder timm loads, optionally published on the Hugging Face Hub.

The export folder format is :mod:`smi_timm.export`; the model card and the upload are :mod:`smi_timm.publish`.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Optional, Sequence

from ..export import CONFIG_NAME, PROJECTOR_NAME, WEIGHTS_NAME, export_run
from ..layout import is_run_dir
from ..publish import push_to_hub, write_model_card
from .common import run_cli

__all__ = ["main", "build_parser"]

PROG = "smi-export"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG, description="Export a run's backbone (latest complete checkpoint) as a folder timm loads with "
                               "timm.create_model('local-dir:OUT_DIR', pretrained=True).")
    parser.add_argument("path", help="run directory, checkpoint folder (checkpoints/step_N) or its model.safetensors")
    parser.add_argument("out_dir", help="output folder (model.safetensors + config.json)")
    parser.add_argument("--with-projector", action="store_true",
                        help="also write projector.safetensors (projector keys without the 'projector.' prefix)")
    parser.add_argument("--push-to-hub", metavar="ORG/NAME", default=None,
                        help="then upload the folder, with a model card (README.md), to this Hugging Face Hub "
                             "repo (token: huggingface-cli login or HF_TOKEN); timm.create_model('hf-hub:ORG/NAME') "
                             "loads it")
    parser.add_argument("--private", action="store_true", help="with --push-to-hub: create a private repository")
    parser.add_argument("--results", nargs="+", default=[], metavar="JSON",
                        help="smi-eval result files (--out) measured on this export, for the model card")
    return parser


def _push(args, out: Path, results) -> int:
    run_dir = Path(args.path) if is_run_dir(Path(args.path)) else None
    print(f"wrote {write_model_card(out, repo_id=args.push_to_hub, run_dir=run_dir, results=results)}")
    try:
        url = push_to_hub(out, args.push_to_hub, private=args.private)
    except Exception as err:  # network, authentication, permissions: say so, the export itself is done
        print(f"{PROG}: error: the export is in {out}, but uploading it to {args.push_to_hub} failed: "
              f"{type(err).__name__}: {err}", file=sys.stderr)
        return 1
    print(f"uploaded to https://huggingface.co/{args.push_to_hub} ({url}); load with: "
          f"timm.create_model('hf-hub:{args.push_to_hub}', pretrained=True)")
    return 0


def _export(args) -> int:
    config = export_run(args.path, args.out_dir, with_projector=args.with_projector)
    results = [json.loads(Path(f).read_text(encoding="utf-8")) for f in args.results]
    out = Path(args.out_dir)
    print(f"wrote {out / WEIGHTS_NAME} (sha256 {config['sha256']}, architecture {config['architecture']}, "
          f"step {config['smi']['step']})")
    if args.with_projector:
        print(f"wrote {out / PROJECTOR_NAME} (sha256 {config['smi']['projector_sha256']})")
    print(f"wrote {out / CONFIG_NAME}")
    print(f"load with: import smi_timm, timm; timm.create_model('local-dir:{out}', pretrained=True)")
    return _push(args, out, results) if args.push_to_hub else 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    return run_cli(PROG, lambda: _export(args))


if __name__ == "__main__":  # pragma: no cover
    sys.exit(main())
