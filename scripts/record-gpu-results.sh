#!/usr/bin/env bash
# Record what a GPU session brought back (the folder of its $OUT files) into this checkout:
# reference/<profile>/<experiment>/ (the glance page's recorded column), bench/results/fixmatch_cuda.json and
# bench/results/step_times.json (fmnist-book plan), reference/<profile>/session-<plan>.json (the session).
#   scripts/record-gpu-results.sh FOLDER [--root PROJECT_ROOT]
set -euo pipefail
cd "$(dirname "$0")/.."
py=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
exec "$py" -m fmnist_core.pipeline.gpu_session record "$@"
