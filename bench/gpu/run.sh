#!/usr/bin/env bash
# One prepared call on a GPU machine (no network; its own Python with torch, triton, pybind11,
# PyYAML; no Hydra, OmegaConf, DALI or data files): install skysense-kernels (building its C++
# extension), -encoders, -losses and -tasks from this working tree without their dependencies,
# then run both checks and print one report:
#   check_kernels.py   the Triton kernels against their references and baselines;
#   aot_report         every Triton launch of the tables compiled for this card: registers,
#                      spills, shared memory, warps per SM, and the driver's own figures
#                      (python -m skysense.kernels.aot_report --native);
#   check_pretrain.py  the full pre-training step at the base and huge presets (samples/s, MFU
#                      against the bf16 matmul rate of the same run, peak memory).
# With $OUT set, the tables land in $OUT/gpu-kernels.txt, $OUT/gpu-compile.md,
# $OUT/gpu-pretrain.txt and together in
# $OUT/gpu-report.md. Well under 10 minutes (each check has its own time limit).
#   bash bench/gpu/run.sh [--dry-run]
#   KERNELS_ARGS="--only attention" PRETRAIN_ARGS="--presets base" bash bench/gpu/run.sh
set -uo pipefail
cd "$(dirname "$0")/../.."
PY=${PYTHON:-python3}
export PIP_BREAK_SYSTEM_PACKAGES=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONUNBUFFERED=1
t0=$(date +%s)
"$PY" -c "import sys, torch, triton; print('python', sys.version.split()[0], 'torch', torch.__version__, 'triton', triton.__version__, 'cuda', torch.cuda.is_available())" || exit 2
if ! "$PY" -m pip install -q --no-deps --no-build-isolation \
        ./kernels ./packages/encoders ./packages/losses ./packages/tasks; then
    # No usable pip/setuptools: build the extension in place and import from the source trees.
    echo "run.sh: pip install failed; building the extension in place" >&2
    (cd kernels && "$PY" setup.py build_ext --inplace) || exit 2
    src="$PWD/kernels/src:$PWD/packages/encoders/src:$PWD/packages/losses/src:$PWD/packages/tasks/src"
    export PYTHONPATH="$src${PYTHONPATH:+:$PYTHONPATH}"
fi
( cd / && "$PY" -c "import skysense.kernels as k, skysense.kernels._C as c, skysense.encoders, skysense.losses, skysense.tasks; print('skysense.kernels from', k.__path__, 'C++:', c.build_info())" ) || exit 2
echo "run.sh: installed in $(( $(date +%s) - t0 ))s"

dry=()
for a in "$@"; do
    case "$a" in
        --dry-run) dry=(--dry-run) ;;
        *) echo "run.sh: unknown argument $a (pass script arguments in KERNELS_ARGS / PRETRAIN_ARGS)" >&2; exit 2 ;;
    esac
done
out=${OUT:-$(mktemp -d)}
mkdir -p "$out"
here=$PWD
# Run from outside the tree so the installed distributions are the ones imported.
# shellcheck disable=SC2086
( cd / && timeout "${KERNELS_TIMEOUT:-240}" "$PY" "$here/bench/gpu/check_kernels.py" \
    "${dry[@]}" --out "$out/gpu-kernels.txt" ${KERNELS_ARGS:-} )
rc_k=$?
echo "run.sh: kernels check exit $rc_k at $(( $(date +%s) - t0 ))s"
if [ ${#dry[@]} -eq 0 ]; then
    compile_args=(--native --workers "${COMPILE_WORKERS:-8}")
else  # no card: one small kernel for sm_90, to know the path works
    compile_args=(--targets 90 --only sk_write --workers 1)
fi
( cd / && timeout "${COMPILE_TIMEOUT:-90}" "$PY" -m skysense.kernels.aot_report \
    "${compile_args[@]}" --out "$out/gpu-compile" > "$out/gpu-compile.log" 2>&1 )
rc_c=$?
tail -n 5 "$out/gpu-compile.log"
echo "run.sh: compile table exit $rc_c at $(( $(date +%s) - t0 ))s"
# shellcheck disable=SC2086
( cd / && timeout "${PRETRAIN_TIMEOUT:-330}" "$PY" "$here/bench/gpu/check_pretrain.py" \
    "${dry[@]}" --out "$out/gpu-pretrain.txt" ${PRETRAIN_ARGS:-} )
rc_p=$?
echo "run.sh: pre-training check exit $rc_p at $(( $(date +%s) - t0 ))s"

{
    for f in gpu-kernels.txt gpu-compile.md gpu-pretrain.txt; do
        if [ -s "$out/$f" ]; then cat "$out/$f"; else echo "# $f: not written (see the log above)"; fi
        echo
    done
    echo "run.sh: kernels exit $rc_k, compile table exit $rc_c, pre-training exit $rc_p, $(( $(date +%s) - t0 ))s in all"
} > "$out/gpu-report.md"
echo "================================================================================"
cat "$out/gpu-report.md"
[ "$rc_k" -eq 0 ] && [ "$rc_c" -eq 0 ] && [ "$rc_p" -eq 0 ]
