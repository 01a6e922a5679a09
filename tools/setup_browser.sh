#!/usr/bin/env bash
# The browser stack of tests/test_browser.py and tools/browser.py: Debian's chromium, and the
# playwright (driving that system browser; no browser download) and netron Python packages.
# Usage: tools/setup_browser.sh [PYTHON]   (default .venv/bin/python); apt-get needs root.
set -euo pipefail
cd "$(dirname "$0")/.."
PY="${1:-.venv/bin/python}"
if [ ! -x /usr/bin/chromium ]; then
  if [ "$(id -u)" -eq 0 ]; then apt-get install -y chromium; else sudo apt-get install -y chromium; fi
fi
"$PY" -m pip install -q playwright netron
"$PY" - <<'PY'
import sys
sys.path.insert(0, "tools")
import browser
why = browser.missing()
print("browser stack: " + (why or "ready (chromium, playwright, netron)"))
sys.exit(1 if why else 0)
PY
