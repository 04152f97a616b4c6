#!/usr/bin/env bash
# Installs what a fresh Debian machine lacks to build and run p2pml, and builds it.
# Safe to repeat: every step checks before it acts.
#   - Debian packages (the Fashion-MNIST data set, Prometheus, build tools)
#   - .venv with torch==2.13.0 from PyPI (libtorch for tch 0.26) and safetensors
#   - the release build of the workspace
# Source scripts/env.sh afterwards to use the same toolchain settings by hand.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

APT_PACKAGES=(dataset-fashion-mnist prometheus python3 python3-venv python3-pip gcc g++ make pkg-config ca-certificates)
TORCH_VERSION=2.13.0

say() { printf '==> %s\n' "$*" >&2; }

missing=()
for p in "${APT_PACKAGES[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
# python3 may come from elsewhere (pyenv): only ask apt for it if there is none.
if command -v python3 >/dev/null && python3 -c 'import venv, ensurepip' 2>/dev/null; then
  missing=("${missing[@]/#python3*/}")
fi
read -r -a missing <<<"${missing[*]:-}"
if ((${#missing[@]})); then
  SUDO=""; [ "$(id -u)" -eq 0 ] || SUDO="sudo"
  say "installing Debian packages: ${missing[*]}"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

if ! command -v cargo >/dev/null; then
  echo "error: cargo is not installed; install the Rust toolchain (rustup, Rust >= 1.94.1) and run this again" >&2
  exit 1
fi

if ! .venv/bin/python -c "import torch, safetensors, numpy, sys; sys.exit(torch.__version__.split('+')[0] != '$TORCH_VERSION')" 2>/dev/null; then
  say "creating .venv with torch==$TORCH_VERSION (a large download the first time)"
  [ -x .venv/bin/python ] || python3 -m venv .venv
  .venv/bin/pip install -q --disable-pip-version-check "torch==$TORCH_VERSION" safetensors numpy
fi
# The binaries find libtorch through an rpath to .venv/torch-lib (see .cargo/config.toml).
torch_lib=$(.venv/bin/python -c 'import os, torch; print(os.path.join(os.path.dirname(torch.__file__), "lib"))')
ln -sfn "$torch_lib" .venv/torch-lib

# shellcheck source=env.sh
source scripts/env.sh
say "building the workspace (release)"
cargo build --release --workspace --bins --quiet
