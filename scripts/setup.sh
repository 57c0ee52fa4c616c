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
# The browser test (tests/service/test_page.py) drives Debian's Chromium and its driver; without
# them it skips and says so. Installed only as root with apt-get; never fails the set-up.
if [ -x /usr/bin/chromium ] && [ -x /usr/bin/chromedriver ]; then
  :
elif [ "$(id -u)" -ne 0 ]; then
  echo "note: chromium/chromium-driver missing and not root: the browser test will skip (apt-get install chromium chromium-driver)"
elif ! command -v apt-get >/dev/null 2>&1; then
  echo "note: chromium/chromium-driver missing and no apt-get here: the browser test will skip"
elif ! { apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver; } >/tmp/setup-chromium.log 2>&1; then
  echo "note: apt-get could not install chromium chromium-driver (see /tmp/setup-chromium.log): the browser test will skip"
fi
echo "ready: .venv (activate with: source .venv/bin/activate)"
