#!/usr/bin/env bash
# Before a device run, here: the wheels the GPU machine lacks (../shared/device/wheels.sh, or WHEELS_SH) into .whl/,
# Fashion-MNIST and this commit into .gpu/ (both folders are ignored by git: a device run carries them), and a
# check that what travels fits the device's 64 MiB. Then prints the command to run there.
set -euo pipefail
cd "$(dirname "$0")/.."
wheels=${WHEELS_SH:-../shared/device/wheels.sh}
if ! ls .whl/*.whl >/dev/null 2>&1; then
  [ -f "$wheels" ] || { echo "error: no wheels in .whl/ and no $wheels to make them" >&2; exit 2; }
  wheels=$(realpath "$wheels")
  tmp=$(mktemp -d)  # wheels.sh writes a line into .git/info/exclude, which a worktree has elsewhere
  mkdir -p "$tmp/.git/info"
  (cd "$tmp" && bash "$wheels")
  mv "$tmp/.whl" .whl && rm -rf "$tmp"
fi
mkdir -p .gpu/data
py=${PYTHON:-$( [ -x .venv/bin/python ] && echo .venv/bin/python || echo python3 )}
"$py" - <<'PY'
import shutil
from fmnist_core.core.data import locate_fashion_mnist
for stem, path in locate_fashion_mnist().items():
    shutil.copyfile(path, f".gpu/data/{path.name}")
PY
commit=$(git rev-parse HEAD)
[ -z "$(git status --porcelain --untracked-files=no)" ] || commit="$commit-dirty"
echo "$commit" > .gpu/commit
bytes=$( (git ls-files -co --exclude-standard -z | xargs -0 cat; cat .whl/* .gpu/data/*) | wc -c)
echo "wheels: $(ls .whl | wc -l); data: $(ls .gpu/data | tr '\n' ' '); commit: $commit"
echo "what travels: $((bytes / 1048576)) MiB of the 64 MiB limit"
[ "$bytes" -le $((64 * 1048576)) ] || { echo "error: more than 64 MiB would travel" >&2; exit 1; }
echo "device run: command 'bash scripts/gpu-session.sh --plan book --budget-s 540', carry [\".whl\", \".gpu\"], timeout_s 570"
