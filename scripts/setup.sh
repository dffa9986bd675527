#!/usr/bin/env bash
# Create .venv and install sgz-serve into it (idempotent: a second run only checks).
# torch is installed first and pinned, so nothing else pulls a multi-GB CUDA build on a CPU
# machine. For a CUDA build elsewhere, set TORCH_SPEC, e.g.
#   TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128" ./scripts/setup.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
TORCH_SPEC=${TORCH_SPEC:-torch==2.13.0}
EXTRAS=${EXTRAS:-train,eval,test,bench,onnx,otel,ray}
if [ ! -x .venv/bin/python ]; then
  "$PYTHON" -m venv .venv
fi
# Debian packages that tests drive as real processes: chromium through Playwright
# (tests/test_page.py; never `playwright install`, which downloads a browser), redis-server and
# nginx (tests/test_scaleout.py), prometheus (tests/test_prometheus.py). One apt-get install for
# all that are missing, where we can; else say how (those tests skip with the reason).
missing=()
command -v chromium >/dev/null 2>&1 || command -v chromium-browser >/dev/null 2>&1 \
  || missing+=(chromium)
for binary in redis-server nginx prometheus; do
  command -v "$binary" >/dev/null 2>&1 || [ -x "/usr/sbin/$binary" ] || missing+=("$binary")
done
if [ ${#missing[@]} -gt 0 ]; then
  export DEBIAN_FRONTEND=noninteractive
  if command -v apt-get >/dev/null 2>&1 && [ "$(id -u)" = 0 ]; then
    echo "installing ${missing[*]} (Debian packages) for the tests that drive them"
    # their system services must not start: the tests run their own on free ports
    if [ ! -e /usr/sbin/policy-rc.d ]; then
      printf '#!/bin/sh\nexit 101\n' >/usr/sbin/policy-rc.d && chmod +x /usr/sbin/policy-rc.d
      trap 'rm -f /usr/sbin/policy-rc.d' EXIT
    fi
    { apt-get install -y -qq "${missing[@]}" \
        || { apt-get update -qq && apt-get install -y -qq "${missing[@]}"; }
    } >/dev/null 2>&1 || echo "could not install ${missing[*]}: their tests will be skipped" >&2
  else
    echo "no ${missing[*]}: their tests will be skipped (sudo apt-get install ${missing[*]})" >&2
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
