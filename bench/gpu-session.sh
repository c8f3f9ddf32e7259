#!/usr/bin/env bash
# On a lent GPU machine: install the wheels bench/fetch-wheels.sh put in .whl/ (when carried), then run every
# GPU check and benchmark within one time budget (bench/gpu_session.py; arguments go to it), reports in $OUT.
# RUN_LIMIT is the device command's own time limit (default 570 s): the session's budget is what is left of it
# after the set-up here, less 60 s for the clean-up after the last stage and a margin (490 s at most).
# The lent copy has no .git: run `python bench/gpu_session.py --stamp` beforehand to send the commit along.
set -euo pipefail
cd "$(dirname "$0")/.."
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
  export PYTHONPATH="/tmp/site:$PWD"
fi
export PYTHONUNBUFFERED=1 TORCHINDUCTOR_CACHE_DIR="${TORCHINDUCTOR_CACHE_DIR:-/tmp/inductor}"
export TORCH_LOGS="${TORCH_LOGS:-recompiles}"  # a recompile in any stage shows in the session log
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv || true
if [[ -f bench/COMMIT ]]; then echo "commit (bench/COMMIT): $(cat bench/COMMIT)"; fi
budget=$(( ${RUN_LIMIT:-570} - SECONDS - 60 ))
if (( budget > 490 )); then budget=490; fi
echo "session budget: ${budget} s (${SECONDS} s of set-up so far)"
exec python3 bench/gpu_session.py --out "${OUT:-bench/results/session}" --budget "$budget" "$@"
