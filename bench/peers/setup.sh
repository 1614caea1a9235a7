#!/usr/bin/env bash
# Builds the bench's peer environments from PyPI, each with the project's pins (constraints.txt)
# for torch, torchvision, numpy, rasterio and timm:
#   .venv-peers            torchgeo 0.10 (the loader peer)
#   .venv-peers-terratorch terratorch 1.2.13 with the torchgeo it pins (<0.10: its package
#                          imports torchgeo.trainers.utils, which 0.10 removed); the inference
#                          peer runs our model: infer_run.py puts the sources of the checkout it
#                          belongs to on sys.path (nothing of a checkout is baked in here, so
#                          $SKYSENSE_PEERS_VENV can be shared between checkouts)
# Both need Python >= 3.12 (torchgeo >= 0.9 requires it; the project's .venv is 3.11), hence
# environments of their own. Idempotent: a stamp newer than this script skips the work. A failed
# build writes its reason to <env>/.peers-absent, which the bench reports as "peer absent".
set -u
ROOT=$(cd "$(dirname "$0")/../.." && pwd)
PREFIX=${SKYSENSE_PEERS_VENV:-$ROOT/.venv-peers}

find_python() {
    [ -n "${PEERS_PYTHON:-}" ] && { echo "$PEERS_PYTHON"; return; }
    local root
    root=$(pyenv root 2>/dev/null || echo /nonexistent)
    for p in python3.12 python3.13 "$root"/versions/3.12*/bin/python3 "$root"/versions/3.13*/bin/python3; do
        if "$p" -c 'import sys; assert sys.version_info >= (3, 12)' 2>/dev/null; then
            echo "$p"; return
        fi
    done
}

# build VENV CHECK SPEC... : one environment holding SPEC (pip requirement strings), and
# CHECK (Python code) must run in it.
build() {
    local venv=$1 check=$2; shift 2
    local stamp=$venv/.peers-installed absent=$venv/.peers-absent log=$venv/setup.log
    if [ -f "$stamp" ] && [ "$stamp" -nt "$0" ] && [ "$stamp" -nt "$ROOT/constraints.txt" ]; then
        return 0
    fi
    mkdir -p "$venv"
    : > "$log"
    fail() {  # the old stamp stays while a rebuild runs: a bench in progress keeps its peer
        rm -f "$stamp"
        echo "$1" > "$absent"
        echo "skysense bench: peer absent ($venv): $1 (log: $log)" >&2
        return 1
    }
    [ -n "$PY" ] || { fail "no Python >= 3.12 found (torchgeo >= 0.9 requires it; set PEERS_PYTHON)"; return 1; }
    echo "skysense bench: setting up $venv ($*) with $PY: a few minutes the first time"
    test -x "$venv/bin/python" || "$PY" -m venv "$venv" >>"$log" 2>&1 || { fail "python -m venv failed"; return 1; }
    "$venv/bin/python" -m pip --disable-pip-version-check install -q -c "$ROOT/constraints.txt" "$@" \
        >>"$log" 2>&1 || { fail "pip install $* failed: $(grep -E '^ERROR' "$log" | tail -3 | tr '\n' ' ')"; return 1; }
    # an older build's skysense-src.pth named the checkout that built it: gone
    rm -f "$("$venv/bin/python" -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])')/skysense-src.pth"
    "$venv/bin/python" -c "$check" >>"$log" 2>&1 || { fail "$check: $(tail -1 "$log")"; return 1; }
    rm -f "$absent"
    touch "$stamp"
}

PY=$(find_python)
rc=0
build "$PREFIX" "import torchgeo.datasets, torchgeo.samplers" "${TORCHGEO_SPEC:-torchgeo==0.10.*}" || rc=1
build "$PREFIX-terratorch" "from terratorch.tasks.tiled_inference import tiled_inference" \
    "${TERRATORCH_SPEC:-terratorch==1.2.13}" hydra-core omegaconf safetensors tqdm || rc=1
exit $rc
