#!/usr/bin/env bash
# Wheels for the GPU machine (`device` tool), whose image has torch and triton but not the rest:
# downloads them into .whl/ (git-ignored), which `gpu_check.sh` installs from. Run here, before
# the first device call; carry `.whl` with it. Python 3.12 manylinux wheels (the device image's).
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p .whl
for p in spikingjelly==2.0.0 dcls==0.1.1 loguru==0.7.3 scienceplots==2.2.2 hydra-core==1.3.8 omegaconf==2.3.1; do
    python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
        --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl "$p" \
        || python3 -m pip download -q --no-deps -d .whl "$p"
done
# antlr4 (hydra's parser) comes as an sdist only: build its wheel here
ls .whl/antlr4_python3_runtime-4.9.3-*.whl >/dev/null 2>&1 \
    || python3 -m pip wheel -q --no-deps -w .whl antlr4-python3-runtime==4.9.3
ls -1 .whl
