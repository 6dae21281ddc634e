"""``smi-make-shards``: an image folder or a ``path<TAB>label`` list written as WebDataset shards with a JSON index.

The writer is :func:`smi_timm.data.shards.write_shards`; this module parses flags and prints its summary. It imports
no torch, so the command starts fast.
"""
from __future__ import annotations

import argparse
import json
import sys
from typing import Optional, Sequence

from ..data.shards import write_shards
from .common import fail, run_cli

__all__ = ["main", "build_parser"]

PROG = "smi-make-shards"


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=PROG,
        description="Write an image folder (one sub-folder per class, or unlabeled images) or a 'path<TAB>label' "
                    "list as WebDataset shards with a JSON index.",
    )
    parser.add_argument("src", help="ImageFolder-style directory, folder of unlabeled images, or text file of "
                                    "path<TAB>label lines")
    parser.add_argument("out_pattern", help="shard pattern with an integer field, e.g. out/train-%%06d.tar or .tar.gz")
    parser.add_argument("--maxcount", type=int, default=10000, help="samples per shard at most (default 10000)")
    parser.add_argument("--maxsize", type=int, default=1 << 30, help="tar bytes per shard at most (default 1 GiB)")
    parser.add_argument("--shuffle-seed", type=int, default=0,
                        help="seed of the sample shuffle (default 0); -1 keeps the sorted listing order")
    parser.add_argument("--quality", type=int, default=95, help="JPEG quality for re-encoded images (default 95)")
    parser.add_argument("--workers", type=int, default=1, help="processes reading images (default 1)")
    parser.add_argument("--summary-json", default=None, help="also write the summary (with all skipped files) here")
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")
    labels = parser.add_mutually_exclusive_group()
    labels.add_argument("--unlabeled", dest="unlabeled", action="store_const", const=True, default=None,
                        help="no labels: every image under SRC, recursively (default when SRC has no sub-folders)")
    labels.add_argument("--labeled", dest="unlabeled", action="store_const", const=False,
                        help="require class sub-folders (SRC/<class>/<image>)")
    return parser


def _make(args) -> int:
    summary = write_shards(
        args.src, args.out_pattern, maxcount=args.maxcount, maxsize=args.maxsize,
        shuffle_seed=None if args.shuffle_seed < 0 else args.shuffle_seed, quality=args.quality,
        workers=args.workers, progress=not args.no_progress, unlabeled=args.unlabeled,
    )
    print(summary.format())
    if args.summary_json:
        with open(args.summary_json, "w", encoding="utf-8") as f:
            json.dump(summary.to_dict(), f, indent=1)
    if summary.num_samples == 0:
        return fail(PROG, "no readable images found", 1)
    return 0


def main(argv: Optional[Sequence[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    return run_cli(PROG, lambda: _make(args))


if __name__ == "__main__":
    sys.exit(main())
