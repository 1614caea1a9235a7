#!/usr/bin/env bash
# One prepared call on a GPU machine (no network; its own Python with torch, triton, pybind11):
# install skysense-kernels from this working tree, build its C++ extension, run the check, and
# leave the table in $OUT/gpu-kernels.txt when $OUT is set. Well under 10 minutes.
#   bash bench/gpu/run.sh [check_kernels.py arguments]
set -euo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-python3}
export PIP_BREAK_SYSTEM_PACKAGES=1 PIP_DISABLE_PIP_VERSION_CHECK=1
t0=$(date +%s)
"$PY" -c "import sys, torch, triton; print('python', sys.version.split()[0], 'torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.cuda.is_available())"
if ! "$PY" -m pip install -q --no-deps --no-build-isolation ./kernels; then
    # No usable pip/setuptools: build the extension in place and import from the source tree.
    echo "run.sh: pip install failed; building the extension in place" >&2
    (cd kernels && "$PY" setup.py build_ext --inplace)
    export PYTHONPATH="$PWD/kernels/src${PYTHONPATH:+:$PYTHONPATH}"
fi
"$PY" -c "import skysense.kernels as k, skysense.kernels._C as c; print('skysense.kernels from', k.__path__, 'C++:', c.build_info())"
echo "run.sh: installed in $(( $(date +%s) - t0 ))s"
out_args=()
if [ -n "${OUT:-}" ]; then out_args=(--out "$OUT/gpu-kernels.txt"); fi
# Run from outside the tree so the installed distribution is the one imported.
( cd / && "$PY" "$OLDPWD/bench/gpu/check_kernels.py" "${out_args[@]}" "$@" )
echo "run.sh: done in $(( $(date +%s) - t0 ))s"
