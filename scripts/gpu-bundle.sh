#!/usr/bin/env bash
# Builds what the lent GPU machine can run: that machine is offline, has no Rust and its Python carries torch
# 2.11.0+cu130, not the 2.13.0 tch 0.26 was made for. So this builds radit here against the libtorch of torch 2.11.0
# (the wheel's headers and libraries; tch's version check bypassed), release, stripped, into gpu-bundle/ with the
# OpenMPI libraries it links (that machine need not have them) and the check script. On the GPU machine radit
# loads that machine's own torch 2.11 libraries (scripts/gpu-check.sh puts them on LD_LIBRARY_PATH).
# Usage: scripts/gpu-bundle.sh   (then run scripts/gpu-check.sh there, carrying gpu-bundle)
#        scripts/gpu-bundle.sh --stubs-only   (only find the wrappers torch 2.11 lacks; prints and checks the list)
set -euo pipefail
stubs_only=0
[ "${1:-}" = --stubs-only ] && stubs_only=1
root="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
"$root/scripts/setup.sh" >/dev/null
# shellcheck source=env.sh
source "$root/scripts/env.sh"
version=${RADIT_GPU_TORCH_VERSION:-2.11.0}
site="$RADIT_CACHE/torch-$version-site"
log() { printf '[gpu-bundle] %s\n' "$*" >&2; }

if [ ! -f "$site/torch/version.py" ]; then
  log "fetching the torch $version wheel (its libtorch headers and libraries)"
  dl=$(mktemp -d)
  "$RADIT_VENV/bin/pip" download -q --no-deps --only-binary=:all: "torch==$version" -d "$dl"
  mkdir -p "$site.tmp"
  unzip -q -o "$dl"/torch-"$version"-*.whl 'torch/include/*' 'torch/lib/*' 'torch/share/*' 'torch/version.py' -d "$site.tmp"
  rm -rf "$dl" "$site"
  mv "$site.tmp" "$site"
fi
# The CUDA libraries and headers of the project's own wheel (same CUDA 13), where libtorch's RUNPATH
# ($ORIGIN/../../nvidia/...) looks for them when the linker resolves libtorch_cuda's dependencies.
ln -sfn "$("$RADIT_VENV/bin/python" -c 'import nvidia, os; print(list(nvidia.__path__)[0])')" "$site/nvidia"
grep -q "__version__ = '$version" "$site/torch/version.py" || { log "$site is not torch $version"; exit 2; }

# tch 0.26's generated C++ shim wraps ops of libtorch 2.13; against an older libtorch the wrappers of ops it lacks
# do not compile. A patched copy of torch-sys stubs exactly those (radit calls none of them), found by compiling the
# shim until it compiles; the build runs in a copy of the workspace so that the patch never touches Cargo.lock.
find_torch_sys() { find "$HOME/.cargo/registry/src" -maxdepth 2 -name 'torch-sys-0.26.0' -type d | head -n 1; }
torch_sys_src=$(find_torch_sys)
[ -n "$torch_sys_src" ] || { (cd "$root" && cargo fetch -q) && torch_sys_src=$(find_torch_sys); }
patched="$RADIT_CACHE/torch-sys-0.26.0-for-torch-$version"
if [ ! -f "$patched/.radit-stubbed" ]; then
  rm -rf "$patched"
  cp -r "$torch_sys_src" "$patched"
  chmod -R u+w "$patched"
  for round in 1 2 3; do
    if c++ -std=c++17 -D_GLIBCXX_USE_CXX11_ABI=1 -fsyntax-only -w -I "$site/torch/include" \
      -I "$site/torch/include/torch/csrc/api/include" "$patched/libtch/torch_api_generated.cpp" 2>"$patched/errors.txt"; then
      touch "$patched/.radit-stubbed"
      break
    fi
    n=$("$RADIT_VENV/bin/python" "$root/scripts/python/stub_torch_ops.py" "$patched/libtch/torch_api_generated.cpp" "$patched/errors.txt")
    log "round $round: stubbed $n wrapper(s) of ops torch $version lacks"
  done
  [ -f "$patched/.radit-stubbed" ] || { log "the shim still does not compile against torch $version: $patched/errors.txt"; exit 1; }
fi
# The stubbed wrappers, against the list scripts/check-stubbed-ops.py holds radit's code to: a new libtorch or tch
# that stubs another op must update that list (and the check then says whether radit calls it).
grep -o 'throw std::runtime_error("atg_[A-Za-z0-9_]*' "$patched/libtch/torch_api_generated.cpp" |
  sed 's/.*("//' | sort -u >"$patched/stubbed.txt"
if ! diff -u "$root/scripts/gpu-stubbed-ops.txt" "$patched/stubbed.txt" >&2; then
  log "the wrappers stubbed for torch $version differ from scripts/gpu-stubbed-ops.txt (above): update that file"
  exit 1
fi
python3 "$root/scripts/check-stubbed-ops.py" "$root/scripts/gpu-stubbed-ops.txt"
if [ "$stubs_only" = 1 ]; then
  log "stubbed $(wc -l <"$patched/stubbed.txt") wrapper(s) for torch $version; radit calls none of them"
  exit 0
fi

log "building radit against torch $version ($site/torch) into target/gpu-bundle"
work="$RADIT_CACHE/gpu-bundle-src"
rm -rf "$work"
mkdir -p "$work"
git -C "$root" ls-files -z --cached --others --exclude-standard | (cd "$root" && xargs -0 cp --parents -t "$work")
env -u LIBTORCH_USE_PYTORCH LIBTORCH="$site/torch" LIBTORCH_CXX11_ABI=1 LIBTORCH_BYPASS_VERSION_CHECK=1 \
  CARGO_TARGET_DIR="$root/target/gpu-bundle" \
  cargo build --release --quiet --bin radit --manifest-path "$work/Cargo.toml" \
  --config "patch.crates-io.torch-sys.path=\"$patched\""

out="$root/gpu-bundle"
rm -rf "$out"
mkdir -p "$out/lib"
strip -o "$out/radit" "$root/target/gpu-bundle/release/radit"
# What the binary needs beyond glibc and libtorch (which the GPU machine's torch provides): OpenMPI and its
# dependencies, as Debian ships them (only loaded: a single process never initialises MPI). Not libtorch and the CUDA/NCCL wheels beside it (that machine's torch brings
# its own), and not glibc, libstdc++ or libgcc (the newer ones there serve a binary built here).
ldd "$out/radit" | awk '/=> \// {print $1, $3}' | while read -r name path; do
  case "$path" in */torch/lib/* | */nvidia/*) continue ;; esac
  case "$name" in
    libc.so* | libm.so* | libdl.so* | librt.so* | libpthread.so* | libutil.so* | libresolv.so* | ld-linux*) ;;
    libstdc++* | libgcc_s*) ;;
    *) cp -L "$path" "$out/lib/$name" ;;
  esac
done
cp "$root/scripts/gpu-check.sh" "$out/"
echo "torch $version" >"$out/BUILT_AGAINST"
du -sh "$out" >&2
log "ready: $out (carry it to the GPU machine and run gpu-bundle/gpu-check.sh there)"
