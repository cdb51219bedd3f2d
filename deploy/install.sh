#!/usr/bin/env bash
# Idempotent set-up of a bare machine: Debian packages, a venv in .venv, the project with its extras.
# Usage: deploy/install.sh [EXTRAS]   (default EXTRAS: psana,dev)
set -euo pipefail
cd "$(dirname "$0")/.."
EXTRAS="${1:-psana,dev}"
VENV="${VENV:-.venv}"

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

[ -x "$VENV/bin/python" ] || python3 -m venv "$VENV"
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
