#!/usr/bin/env bash
# Headless Chromium for the browser test (tests/test_ui_browser.py): Debian's `chromium` and
# `chromium-driver` packages. Playwright's own browser download does not work offline; selenium
# (a dev dependency) drives this binary. Installs only when missing and when it can (root, apt).
set -euo pipefail
if [[ -x /usr/bin/chromium && -x /usr/bin/chromedriver ]]; then
  exit 0
fi
if [[ $(id -u) -eq 0 ]] && command -v apt-get >/dev/null; then
  echo "installing Debian's chromium and chromium-driver for the browser test" >&2
  apt-get update -qq
  DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null
else
  echo "chromium not found and cannot install it here (needs root and apt-get):" \
       "the browser test will skip (sudo apt-get install chromium chromium-driver)" >&2
fi
