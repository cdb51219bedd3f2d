#!/usr/bin/env bash
# Idempotent set-up of a bare machine: Debian packages, a venv in .venv, the project with its extras.
# Usage: [PYTHON=/usr/bin/python3] deploy/install.sh [EXTRAS]   (default EXTRAS: psana,dev)
set -euo pipefail
cd "$(dirname "$0")/.."
EXTRAS="${1:-psana,dev}"
VENV="${VENV:-.venv}"
PYTHON="${PYTHON:-python3}"   # the venv's interpreter: the first python3 on PATH unless named

# System packages: gcc, libkrb5-dev and python3-dev (Python.h, for a venv of Debian's python3) build
# pykerberos for psana (an sdist only); prometheus (with promtool) is the node's
# monitoring and the monitoring tests' server; with the dev extra, docker-compose validates
# docker/compose.yaml (`config`, no engine needed). Services already running are left as they are: the tests
# start their own Prometheus on a free port, and a monitoring node's Prometheus must stay up.
APT_PKGS=(gcc libkrb5-dev prometheus python3-dev python3-venv)
[[ ",$EXTRAS," == *",dev,"* ]] && APT_PKGS+=(docker-compose)
missing=()
for p in "${APT_PKGS[@]}"; do dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p"); done
if ((${#missing[@]})); then
    SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
    $SUDO apt-get update -qq
    DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

[ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
# A service user (systemd's User=hitfinder) runs the venv's interpreter where it lives: one under a home
# that others cannot enter (root's pyenv or conda) starts for its owner only. Said for a service's install
# (without the dev extra).
[[ ",$EXTRAS," == *",dev,"* ]] || "$VENV/bin/python" - "$VENV" <<'PY'
import os, sys
venv = sys.argv[1]
real = os.path.realpath(sys.executable)
parents = []
d = os.path.dirname(real)
while d != os.path.dirname(d):
    parents.append(d)
    d = os.path.dirname(d)
closed = [d for d in parents if not os.stat(d).st_mode & 0o001]  # no x for others: not to be entered
if closed:
    print(f"install.sh: warning: {venv} runs {real}, under {closed[-1]}, which other users cannot enter: a service "
          f"user (systemd's User=hitfinder) could not start it. For a service, install with PYTHON=/usr/bin/python3 "
          f"(remove {venv} first).", file=sys.stderr)
PY
stamp="$VENV/.installed-$(cat pyproject.toml | sha256sum | cut -c1-16)-${EXTRAS//,/_}"
if [ ! -f "$stamp" ]; then
    "$VENV/bin/pip" install -q --upgrade pip
    # The CPU wheel of torch first, from PyTorch's CPU index (PyPI's Linux wheel is the CUDA build; the
    # configured index where that one is unreachable), so that the range in pyproject is already met.
    "$VENV/bin/python" -c "import torch" 2>/dev/null \
        || "$VENV/bin/pip" install -q --retries 0 --timeout 20 --index-url https://download.pytorch.org/whl/cpu "torch==2.13.0" \
        || "$VENV/bin/pip" install -q "torch==2.13.0"
    # A venv that has onnxruntime-gpu stays a GPU venv when installed again with other extras (`make test`
    # on a GPU node after `install.sh psana,gpu`): the base dependency would bring the CPU package back.
    gpu=0
    [[ ",$EXTRAS," == *",gpu,"* ]] && gpu=1
    "$VENV/bin/pip" show -q onnxruntime-gpu >/dev/null 2>&1 && gpu=1
    "$VENV/bin/pip" install -q -e ".[${EXTRAS}]"
    if ((gpu)); then
        # onnxruntime (a base dependency) and onnxruntime-gpu install the same module: keep the GPU one
        # (as docker/Dockerfile.gpu does), or the CUDA provider is silently missing.
        "$VENV/bin/pip" uninstall -q -y onnxruntime
        "$VENV/bin/pip" install -q --force-reinstall --no-deps "onnxruntime-gpu>=1.27,<2"
    fi
    rm -f "$VENV"/.installed-*
    touch "$stamp"
fi
