#!/usr/bin/env bash
# One set-up command: creates .venv and installs the service, the build tools (torch) and the
# test dependencies. Re-running it is cheap (pip skips what is installed).
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
.venv/bin/python -m pip install -q --upgrade pip
.venv/bin/python -m pip install -q -e ".[build,openvino,test]"
echo "ready: .venv (activate with: source .venv/bin/activate)"
