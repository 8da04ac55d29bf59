#!/usr/bin/env bash
# Installs Chromium from Debian (as root) for the headless-browser test of the run report (tests/test_report.py).
# Idempotent: installs nothing when a chromium binary is already on PATH.
set -euo pipefail
if command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1; then
  exit 0
fi
if [ "$(id -u)" != 0 ]; then
  echo "install_chromium.sh: run as root (apt-get install chromium)" >&2
  exit 1
fi
echo "installing chromium (apt-get)" >&2
export DEBIAN_FRONTEND=noninteractive
apt-get update -qq
apt-get install -y -qq --no-install-recommends chromium >/dev/null
