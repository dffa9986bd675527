#!/usr/bin/env bash
# Create .venv and install sgz-serve into it (idempotent: a second run only checks).
# torch is installed first and pinned, so nothing else pulls a multi-GB CUDA build on a CPU
# machine. For a CUDA build elsewhere, set TORCH_SPEC, e.g.
#   TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128" ./scripts/setup.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
EXTRAS=${EXTRAS:-train,eval,test,bench,onnx}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
# tests/test_page.py drives Debian's chromium through Playwright (never `playwright install`,
# which downloads a browser): install the package where we can, else say how.
if ! command -v chromium >/dev/null 2>&1 && ! command -v chromium-browser >/dev/null 2>&1; then
  export DEBIAN_FRONTEND=noninteractive
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    echo "installing chromium (Debian package) for tests/test_page.py"
    { apt-get install -y -qq chromium || { apt-get update -qq && apt-get install -y -qq chromium; }
    } >/dev/null 2>&1 || echo "could not install chromium: tests/test_page.py will be skipped" >&2
  else
    echo "no chromium: tests/test_page.py will be skipped (sudo apt-get install chromium)" >&2
  fi
fi
stamp=".venv/.sgz-installed-$(cat pyproject.toml scripts/setup.sh | sha256sum | cut -c1-16)-${EXTRAS//,/_}"
if [ -f "$stamp" ]; then exit 0; fi
.venv/bin/python -m pip install -q --upgrade pip 2>&1 | grep -v "is ignored" || true
# shellcheck disable=SC2086
.venv/bin/python -m pip install -q $TORCH_SPEC 2>&1 | grep -v "is ignored" || true
.venv/bin/python -m pip install -q -e ".[${EXTRAS}]" 2>&1 | grep -v "is ignored" || true
.venv/bin/python -c "import torch, model; print('sgz-serve installed: torch', torch.__version__)"
rm -f .venv/.sgz-installed-*
touch "$stamp"
