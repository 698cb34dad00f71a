#!/usr/bin/env bash
# Installs everything radit needs on a fresh Debian machine. Safe to re-run: each step checks first.
#  - Debian packages (build helpers, OpenMPI, Prometheus + promtool + Pushgateway for the monitoring tests; Slurm comes from
#    scripts/slurm-local.sh)
#  - a Python virtualenv with PyTorch 2.13.0 (the libtorch tch links) and the test/benchmark packages, cached
#    outside the repository in $RADIT_CACHE (default ~/.cache/radit), keyed by the torch version
set -euo pipefail
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
# shellcheck source=env.sh
source "$root/scripts/env.sh"

log() { printf '[setup] %s\n' "$*" >&2; }

# OpenMPI (mpirun, and the library and headers the mpi crate binds with libclang) for the CPU collectives; cmake and
# g++ build CharLS for the `dicom-jls` feature (OpenJPEG for `dicom-j2k` needs only the C compiler); cmake and nasm
# build libjpeg-turbo for 12-bit JPEG; dcmtk's dcmcjpeg writes the 12-bit JPEG files its twin test decodes.
apt_packages=(pkg-config openmpi-bin libopenmpi-dev libclang-dev prometheus prometheus-pushgateway cmake g++ nasm dcmtk)
missing=()
for p in "${apt_packages[@]}"; do
  dpkg -s "$p" >/dev/null 2>&1 || missing+=("$p")
done
if ((${#missing[@]})); then
  log "installing Debian packages: ${missing[*]}"
  if [ "$(id -u)" -ne 0 ]; then sudo=sudo; else sudo=; fi
  $sudo apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $sudo apt-get install -y -qq "${missing[@]}" >/dev/null
fi

command -v cargo >/dev/null || { log "cargo not found: install Rust (rustup) first"; exit 2; }

python=${RADIT_PYTHON:-python3}
stamp="$RADIT_VENV/.radit-requirements.sha256"
want=$(sha256sum "$root/scripts/requirements.txt" | cut -d' ' -f1)
if [ ! -x "$RADIT_VENV/bin/python" ]; then
  log "creating the virtualenv $RADIT_VENV"
  mkdir -p "$RADIT_CACHE"
  "$python" -m venv "$RADIT_VENV"
fi
if [ "$(cat "$stamp" 2>/dev/null)" != "$want" ]; then
  log "installing Python packages (PyTorch $RADIT_TORCH_VERSION is a large download the first time)"
  "$RADIT_VENV/bin/pip" install -q --disable-pip-version-check -r "$root/scripts/requirements.txt"
  echo "$want" >"$stamp"
fi
"$RADIT_VENV/bin/python" -c "import torch, zarr, moto, torchdiffeq, safetensors; assert torch.__version__.startswith('$RADIT_TORCH_VERSION'), torch.__version__" \
  || { log "the virtualenv $RADIT_VENV is broken; remove it and run again"; exit 2; }
log "ready: $(cargo --version), torch $RADIT_TORCH_VERSION in $RADIT_VENV"
