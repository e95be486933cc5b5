#!/usr/bin/env bash
# `pip install --no-build-isolation -e .` with the oldest pip/setuptools we support (pip 23.2.1,
# setuptools 84) and with the newest, each in a fresh venv that sees the global torch
# (--system-site-packages), on a copy of the working tree. A CPU-only build (LORAFA_BUILD_CUDA=0)
# keeps it quick; each venv then imports lorafa_ext from outside the tree and expects the compiled
# CPU backend.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python}
work=$(mktemp -d)
trap 'rm -rf "$work"' EXIT

mkdir "$work/src"  # tracked and untracked-but-not-ignored files, as a fresh clone would have them
git ls-files -z --cached --others --exclude-standard | while IFS= read -r -d '' f; do
  if [ -f "$f" ]; then cp --parents "$f" "$work/src/"; fi
done

check() {  # check NAME PIP_REQUIREMENTS...
  local name=$1 venv="$work/$1"
  shift
  echo "--- $name: $*"
  "$PYTHON" -m venv --system-site-packages "$venv"
  "$venv/bin/python" -m pip install -q --upgrade "$@"
  "$venv/bin/python" -m pip --version
  "$venv/bin/python" -c "import setuptools; print('setuptools', setuptools.__version__)"
  rm -rf "$work/src/build" "$work/src"/lorafa_ext/_C*.so
  (cd "$work/src" && LORAFA_BUILD_CUDA=0 MAX_JOBS=${MAX_JOBS:-2} \
    "$venv/bin/python" -m pip install -q --no-build-isolation --no-deps -e .)
  (cd "$work" && "$venv/bin/python" -c "
import lorafa_ext
b = lorafa_ext.backend()
print(lorafa_ext.__file__, b)
assert lorafa_ext.__file__.startswith('$work/src/'), 'not the editable install'
assert b == 'cpu', b
")
}

check oldest "pip==23.2.1" "setuptools==84.*"
check newest pip setuptools
echo "editable installs: OK"
