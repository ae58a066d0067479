#!/usr/bin/env bash
# Sets up a development environment from scratch, idempotently:
#   .venv/ with the pinned torch (a CUDA 13.0 build; on our machines it comes from local disk),
#   qcs-ext installed editable with its native extension built.
# Env: PYTHON (default python3), QCS_BUILD_CUDA (auto|0|1), QCS_BUILD_EMULATION (0|1).
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python3}
TORCH_PIN=${TORCH_PIN:-"torch==2.14.1 torchvision==0.29.1"}

if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
PY=.venv/bin/python

if ! $PY -c 'import torch, torchvision' 2>/dev/null; then
  echo "bootstrap: installing $TORCH_PIN" >&2
  # shellcheck disable=SC2086
  $PY -m pip install --quiet $TORCH_PIN
fi

# --no-build-isolation: build against the torch installed above (an isolated build would
# fetch a second torch, ~110 s, and risk an ABI mismatch with the one the ops load into).
echo "bootstrap: building qcs-ext (CUDA=${QCS_BUILD_CUDA:-auto}, emulation=${QCS_BUILD_EMULATION:-0})" >&2
$PY -m pip install --quiet --no-build-isolation -e '.[test]'
$PY -c 'import qcs_ext; print("bootstrap: qcs_ext", qcs_ext.__version__, "ready")'
