# Environment for building radit against the cached PyTorch wheel; sourced by the project's scripts.
# Usage: source scripts/env.sh   (after scripts/setup.sh has installed the wheel)
RADIT_TORCH_VERSION=2.13.0
RADIT_CACHE="${RADIT_CACHE:-${XDG_CACHE_HOME:-$HOME/.cache}/radit}"
RADIT_VENV="$RADIT_CACHE/torch-$RADIT_TORCH_VERSION"
export RADIT_TORCH_VERSION RADIT_CACHE RADIT_VENV
export PATH="$RADIT_VENV/bin:$PATH"
export LIBTORCH_USE_PYTORCH=1
# Keep the Debian libtorch 1.13 out of the link and the loader's way.
unset LIBTORCH LIBTORCH_LIB LIBTORCH_INCLUDE
