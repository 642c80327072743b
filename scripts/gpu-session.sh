#!/usr/bin/env bash
# One GPU session: on a bare CUDA machine holding this checkout (with .whl/ and .gpu/ from
# scripts/gpu-session-prepare.sh), install what is missing, then run a plan's steps within a time budget and pack
# what records them into $OUT (at most 8 files of 16 MiB): session.json, gpu-session.log, fixmatch_bench.json and
# one <experiment>.tar.gz per chapter. Checkpoints stay behind.
#
#   scripts/gpu-session.sh [--plan book|semisupervised|fixmatch] [--budget-s 540] [--out DIR] [--work DIR]
#   scripts/gpu-session.sh --rehearsal --out DIR --work DIR     # the same steps on a CPU, smoke budgets
#
# The budget counts from this script's start; every step gets its share and is killed if it outlives it, and a
# chapter's jobs stop at a history record once its training deadline passes. Exit status: 0 when every step
# succeeded, 1 when one did not (what it left is packed all the same), 2 for bad arguments.
# scripts/record-gpu-results.sh FOLDER then records what came back.
set -uo pipefail
started=$(date +%s)
cd "$(dirname "$0")/.."
py=${PYTHON:-python3}
out=${OUT:-}
args=("$@")
for ((i = 0; i < ${#args[@]}; i++)); do
  [ "${args[$i]}" = "--out" ] && [ $((i + 1)) -lt ${#args[@]} ] && out=${args[$((i + 1))]}
done
if [ -z "$out" ]; then echo "error: no output folder: give --out DIR (on the device, \$OUT is used)" >&2; exit 2; fi
mkdir -p "$out"
log="$out/gpu-session.log"
say() { echo "[$(date +%H:%M:%S) +$(( $(date +%s) - started ))s] $*" | tee -a "$log"; }

# What the machine lacks: papermill, ipykernel and openTSNE come as wheels (.whl/, from ../shared/device/wheels.sh).
if ! "$py" -c "import papermill, ipykernel, openTSNE" 2>/dev/null; then
  if ! ls .whl/*.whl >/dev/null 2>&1; then
    say "error: papermill, ipykernel or openTSNE is missing and there are no wheels in .whl/ (run scripts/gpu-session-prepare.sh, then carry .whl)"
    exit 2
  fi
  say "install: $(ls .whl/*.whl | wc -l) wheels into /tmp/fmnist-site"
  "$py" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/fmnist-site \
    .whl/*.whl >>"$log" 2>&1 || { say "error: the wheels did not install (pip's output is in $log)"; exit 2; }
  export PYTHONPATH=/tmp/fmnist-site${PYTHONPATH:+:$PYTHONPATH}
  "$py" -m ipykernel install --user --name python3 >>"$log" 2>&1 || { say "error: no Jupyter kernel (see $log)"; exit 2; }
else
  say "install: nothing missing"
fi
export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
# The data (no network there) and the commit (the copy may travel without .git), from the preparation.
if [ -d .gpu/data ]; then export FMNIST_DATA_DIR=$PWD/.gpu/data; fi
if [ -f .gpu/commit ]; then export FMNIST_SESSION_COMMIT=$(cat .gpu/commit); fi
"$py" -m fmnist_core.pipeline.cli data >>"$log" 2>&1 || { say "error: no Fashion-MNIST (see $log)"; exit 2; }
say "data: verified"
exec "$py" -m fmnist_core.pipeline.gpu_session session --started "$started" "$@"
