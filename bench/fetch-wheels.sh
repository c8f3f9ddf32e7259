#!/usr/bin/env bash
# Where there is network: download into .whl/ (git-ignored) the wheels that bench/gpu-session.sh installs
# on a lent GPU machine which has torch, transformers, accelerate, aiohttp and pytest but not diffusers.
# Carry .whl with the working tree. Python 3.12 on x86-64 Linux, as those machines run. Checked by installing
# them with --no-deps into a folder for a local Python 3.12 and importing msgspec, redis and importlib_metadata.
set -euo pipefail
cd "$(dirname "$0")/.."
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 \
  -d .whl diffusers==0.42.1 importlib_metadata==10.2.0 lazy-importer==0.1.0 msgspec==0.22.0 redis==7.4.1 peft==0.21.2
ls -l .whl
