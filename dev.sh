#!/usr/bin/env bash
# One entry point for a fresh machine: creates .venv, installs hartkit with every extra, then runs.
#   ./dev.sh demo    generate an image with the built-in default model (hartkit demo)
#   ./dev.sh test    run the test suite (what CI runs)
#   ./dev.sh bench   run the benchmarks (slow)
#   ./dev.sh shell   print how to activate the environment
set -euo pipefail
cd "$(dirname "$0")"

PY=${PYTHON:-python3}
VENV=.venv
STAMP=$VENV/.installed-$(cat pyproject.toml constraints.txt | sha256sum | cut -c1-16)

if [ ! -x "$VENV/bin/python" ]; then
  echo "[dev.sh] creating $VENV with $($PY --version)" >&2
  "$PY" -m venv "$VENV"
fi
if [ ! -f "$STAMP" ]; then
  echo "[dev.sh] installing hartkit[all] (pinned versions: constraints.txt + the extras; torch==2.13.0 CPU) ..." >&2
  # torch first, alone, so the pinned CPU wheel is chosen before anything can ask for another build.
  "$VENV/bin/pip" install --quiet --disable-pip-version-check "torch==2.13.0"
  # The base dependencies are ranges (for apps that embed the runtime); constraints.txt pins the measured set.
  "$VENV/bin/pip" install --quiet --disable-pip-version-check -c constraints.txt -e ".[all]"
  rm -f "$VENV"/.installed-*
  touch "$STAMP"
fi

cmd=${1:-help}
shift || true
case "$cmd" in
  demo)  exec "$VENV/bin/hartkit" demo "$@" ;;
  test)  exec "$VENV/bin/python" -m pytest "$@" ;;
  bench) exec "$VENV/bin/python" -m pytest -m slow "$@" ;;
  shell) echo "source $VENV/bin/activate" ;;
  *) sed -n '2,7p' "$0"; exit 2 ;;
esac
