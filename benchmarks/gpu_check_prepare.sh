#!/usr/bin/env bash
# Put what benchmarks/gpu_check.sh needs and the GPU machine lacks into .gpu/ (ignored by git), so that it travels
# with the working tree (well under the 64 MiB a device call may carry):
#   .gpu/wheels/   wheels of the pure-Python packages the GPU image does not have (webdataset, braceexpand), at the
#                  versions installed here, for Python 3.12 (the image's)
#   .gpu/data/     CIFAR-10 shards and the flowers12 transfer set (section g), copied from DATA_ROOT
#
#     bash benchmarks/gpu_check_prepare.sh DATA_ROOT
set -euo pipefail
DATA_ROOT=${1:?usage: gpu_check_prepare.sh DATA_ROOT (the folder holding cifar10/ and flowers12/)}
cd "$(dirname "$0")/.."
mkdir -p .gpu/wheels .gpu/data
for pkg in webdataset braceexpand; do
    version=$(python -c "import importlib.metadata as m; print(m.version('$pkg'))")
    python -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 --platform any \
        -d .gpu/wheels "$pkg==$version"
done
for set in cifar10 flowers12; do
    rm -rf ".gpu/data/$set"
    cp -r "$DATA_ROOT/$set" ".gpu/data/$set"
done
chmod -R u+w .gpu
du -sh .gpu
