#!/usr/bin/env bash
# Gather, HERE (where pip reaches the registry), the wheels the GPU machine lacks, into .whl/ (git
# ignores it): the GPU machine's image has torch, Triton, pytest and most of qtoy's needs, but not
# the packages below, and it cannot download. Pass `.whl` in the device call's `carry`;
# benchmarks/gpu_check.sh installs them into /tmp/site first. Versions are those of this venv where
# it has the package. The image runs CPython 3.12 on x86-64 (/work/.library/device/KINDS.md).
#
#   bash benchmarks/gpu_wheels.sh        # from the repository root, in the project's venv
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${PYTHON:-python}"
# qtoy's dependencies (and theirs) missing from the image's package list, as read 2026-11-17
MISSING="pydantic pydantic-core annotated-types typing-inspection datasets dill multiprocess quimb cotengra autoray
cytoolz platformdirs"
mkdir -p .whl
for name in $MISSING; do
  version=$("$PY" -m pip show "$name" 2>/dev/null | awk '/^Version:/{print $2}')
  "$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
    --platform manylinux_2_28_x86_64 --platform manylinux_2_27_x86_64 --platform manylinux_2_17_x86_64 \
    --platform manylinux2014_x86_64 --platform manylinux1_x86_64 -d .whl "$name${version:+==$version}"
done
# qtoy itself as a wheel (pure Python): its entry points register the built-in plugins
"$PY" -m pip wheel -q --no-deps --no-build-isolation -w .whl .
du -sh .whl
ls .whl
