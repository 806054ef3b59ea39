#!/usr/bin/env bash
# Installs the CUDA toolkit that `cargo build --features cuda` needs, from PyPI wheels, into a
# cache folder, with no GPU and no root:
#   nvcc, ptxas, headers (candle-kernels compiles its .cu files to PTX at build time),
#   cuBLAS, cuBLASLt, cuRAND, NVRTC (candle's cudarc links them dynamically),
#   NCCL 2.30 (the `nccl` feature links it: data-parallel training over several GPUs),
#   and a link stub libcuda.so made here from cuda.h (the driver itself comes with the GPU's
#   driver at run time; the stub only satisfies the linker, like the toolkit's lib64/stubs).
# The binary then needs at run time the driver's libcuda.so.1 and the toolkit's libcublas.so.13,
# libcublasLt, libcurand.so.10, libnvrtc.so.13, libcudart.so.13 and, built with `nccl`,
# libnccl.so.2 ($CUDA_ROOT/lib here).
#
#   scripts/cuda-toolkit.sh [DIR]        # DIR defaults to $PE_CLIP_CUDA_HOME or ~/.cache/pe-clip/cuda-13.0
#
# It prints the environment to build with; `eval "$(scripts/cuda-toolkit.sh)"` sets it.
# Idempotent: a second run with the toolkit in place only prints. The CUDA version is pinned
# to 13.0 (the oldest 13.x: any CUDA 13 driver runs its PTX, see docs/training.md).
set -euo pipefail

dir="${1:-${PE_CLIP_CUDA_HOME:-$HOME/.cache/pe-clip/cuda-13.0}}"
root="$dir/toolkit"
if [ ! -x "$root/bin/nvcc" ] || [ ! -e "$root/lib64/libcuda.so" ] || [ ! -e "$root/lib64/libnccl.so" ]; then
  echo "cuda-toolkit: installing CUDA 13.0 wheels into $dir" >&2
  rm -rf "$dir.partial"
  mkdir -p "$dir.partial"
  python3 -m venv "$dir.partial/venv" >&2
  "$dir.partial/venv/bin/pip" install -q --disable-pip-version-check \
    "nvidia-cuda-nvcc==13.0.88" "nvidia-cuda-crt==13.0.88" "nvidia-cuda-runtime==13.0.88" \
    "nvidia-cuda-nvrtc==13.0.88" "nvidia-cuda-cccl==13.0.*" "nvidia-cublas==13.0.2.14" \
    "nvidia-curand==10.4.0.35" "nvidia-nvvm==13.0.88" "nvidia-nccl-cu13==2.30.7" >&2
  cu="$(echo "$dir.partial"/venv/lib/python3*/site-packages/nvidia/cu13)"
  [ -x "$cu/bin/nvcc" ] || { echo "cuda-toolkit: no nvcc in $cu" >&2; exit 1; }
  # The wheels keep their files under site-packages; the toolkit is that folder, moved whole
  # (nvcc finds crt/, nvvm/ and include/ relative to itself).
  nccl="$(dirname "$cu")/nccl/lib/libnccl.so.2"
  mv "$cu" "$dir.partial/toolkit"
  mv "$nccl" "$dir.partial/toolkit/lib/"
  rm -rf "$dir.partial/venv"
  t="$dir.partial/toolkit"
  mkdir -p "$t/lib64"
  # The linker asks for unversioned names; the wheels ship only the sonames.
  for lib in cublas cublasLt curand nvrtc cudart nccl; do
    so="$(cd "$t/lib" && ls "lib$lib.so."* | grep -v alt | sort | head -n 1)"
    ln -sf "../lib/$so" "$t/lib64/lib$lib.so"
    ln -sf "../lib/$so" "$t/lib64/$so"
  done
  # libcuda.so stub: every cu* entry point of cuda.h as an empty function, soname libcuda.so.1
  # so that the binary loads the real driver at run time.
  grep -oE '\bcu[A-Z][A-Za-z0-9_]*\s*\(' "$t/include/cuda.h" | tr -d ' (' | sort -u |
    sed 's/.*/void &(void) {}/' >"$t/lib64/cuda_stub.c"
  # cuda.h maps API names to versioned symbols (cuCtxCreate -> cuCtxCreate_v2 ...): add those.
  grep -oE '#define\s+cu[A-Za-z0-9_]+\s+cu[A-Za-z0-9_]+' "$t/include/cuda.h" |
    awk '{print $3}' | sort -u | sed 's/.*/void &(void) {}/' >>"$t/lib64/cuda_stub.c"
  sort -u -o "$t/lib64/cuda_stub.c" "$t/lib64/cuda_stub.c"
  cc -shared -fPIC -w -Wl,-soname,libcuda.so.1 -o "$t/lib64/libcuda.so" "$t/lib64/cuda_stub.c"
  # For starting a cuda build's binary on a machine with no driver (CI: it must load and train
  # on the CPU). Never on LD_LIBRARY_PATH where a GPU is: every driver call would do nothing.
  mkdir -p "$t/stubs"
  ln -sf ../lib64/libcuda.so "$t/stubs/libcuda.so.1"
  rm -rf "$root"
  mkdir -p "$dir"
  mv "$t" "$root"
  rm -rf "$dir.partial"
fi
"$root/bin/nvcc" --version >&2
cat <<EOF
export CUDA_ROOT="$root"
export PATH="$root/bin:\$PATH"
export CUDA_COMPUTE_CAP="\${CUDA_COMPUTE_CAP:-90}"
export LIBRARY_PATH="$root/lib64\${LIBRARY_PATH:+:\$LIBRARY_PATH}"
EOF
