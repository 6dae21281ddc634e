"""Regenerate the bundled CIFAR-10 sample: ``python -m smi_timm.cli.make_sample SRC_DIR [--out DIR]``.

The selection and the files are :mod:`smi_timm.data.make_sample`'s; this module is its command line.
"""
from __future__ import annotations

import argparse
import sys
from typing import Optional, Sequence

from ..data import make_sample as sample_module
from ..data.make_sample import DEFAULT_OUT, make_sample
from .common import run_cli

__all__ = ["main"]

PROG = "python -m smi_timm.cli.make_sample"


def main(argv: Optional[Sequence[str]] = None) -> int:
    p = argparse.ArgumentParser(prog=PROG, description=sample_module.__doc__.splitlines()[0])
    p.add_argument("src", help="folder with the CIFAR-10 shards (train-*.tar.gz, test-*.tar.gz) and classes.txt")
    p.add_argument("--out", default=str(DEFAULT_OUT), help="output folder (default: the package's sample folder)")
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args(argv)

    def body() -> int:
        print(f"wrote sample to {make_sample(args.src, args.out, args.seed)}")
        return 0

    return run_cli(PROG, body)


if __name__ == "__main__":
    sys.exit(main())
