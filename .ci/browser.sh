#!/usr/bin/env bash
# The browser of the console test (tests/api/test_console.py): Debian's chromium and its chromedriver.
# Idempotent: does nothing when chromedriver is already on the PATH.
set -euo pipefail
if command -v chromedriver >/dev/null 2>&1; then
    exit 0
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then SUDO="sudo"; fi
$SUDO apt-get update -qq
DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends chromium chromium-driver
command -v chromedriver
