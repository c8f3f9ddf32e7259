#!/usr/bin/env bash
# On a lent GPU machine: install the wheels bench/fetch-wheels.sh put in .whl/ (when carried), then run every
# GPU check and benchmark within one time budget (bench/gpu_session.py; arguments go to it), reports in $OUT.
set -euo pipefail
cd "$(dirname "$0")/.."
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site:$PWD"
fi
export PYTHONUNBUFFERED=1 TORCHINDUCTOR_CACHE_DIR="${TORCHINDUCTOR_CACHE_DIR:-/tmp/inductor}"
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
exec python3 bench/gpu_session.py --out "${OUT:-bench/results/session}" "$@"
