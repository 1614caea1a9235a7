#!/usr/bin/env bash
# Install each distribution alone into a brand-new venv (with only what it declares, resolved by
# pip from the pinned constraints) and import it. Slow: every venv installs torch (~1 minute and
# ~5.5 GB each here); tests/test_isolation.py is the fast equivalent that runs with `make test`.
#
#   tools/check_fresh_install.sh [kernels encoders losses data tasks]
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-$(command -v python3.11 || command -v python3)}
declare -A DEPS=(
  [kernels]="./kernels"
  [encoders]="./kernels ./packages/encoders"
  [losses]="./kernels ./packages/losses"
  [data]="./kernels ./packages/data"
  [tasks]="./kernels ./packages/encoders ./packages/losses ./packages/data ./packages/tasks"
)
ALL=(kernels encoders losses data tasks)
for d in "${@:-${ALL[@]}}"; do
  venv=$(mktemp -d /tmp/skysense-fresh-$d.XXXX)
  echo "== $d: fresh venv $venv"
  "$PY" -m venv "$venv"
  start=$(date +%s)
  # Build isolation on: each distribution's build requirements come from its pyproject alone.
  "$venv/bin/python" -m pip install -q --disable-pip-version-check -c constraints.txt ${DEPS[$d]}
  others=$(printf '%s\n' "${ALL[@]}" | grep -vxF -f <(echo "${DEPS[$d]}" | tr ' ' '\n' | xargs -n1 basename) | tr '\n' ' ' || true)
  "$venv/bin/python" - "$d" $others <<'PY'
import importlib, importlib.util, sys
name, others = sys.argv[1], sys.argv[2:]
mod = importlib.import_module(f"skysense.{name}")
absent = [o for o in others if importlib.util.find_spec(f"skysense.{o}") is not None]
assert not absent, f"skysense.{name}: siblings installed that were not asked for: {absent}"
print(f"skysense.{name} imports alone from {mod.__file__}")
PY
  echo "== $d: ok in $(( $(date +%s) - start )) s"
  rm -rf "$venv"
done
