#!/usr/bin/env bash
# moecast on an NVIDIA GPU, in one go (about 10 minutes, most of it the release build):
#   1. builds with `--features cuda` (burn-cuda through CubeCL);
#   2. runs the runtime's transformers-parity tests and the predictor's tests on the GPU
#      (MOECAST_TEST_DEVICE=cuda: every test that picks its backend from the environment);
#   3. prints predictor training examples/s on the GPU against the same model in PyTorch
#      on the same GPU (`bench_predictor_torch.py --device cuda`), batch 16 and 64, both
#      tasks, with the ratio.
# Needs: an NVIDIA driver (nvidia-smi), Rust, and NVRTC (the CUDA toolkit, or the
# nvidia-cuda-nvrtc wheel that pip's torch brings); PyTorch with CUDA for step 3 (Burn's
# figures alone without it). The first build downloads Tracel's LLVM bundle from GitHub
# (cubecl-cuda's PTX backend; cached in ~/.local/share/tracel/), so the machine needs
# network access then, or that cache copied in. Usage: tools/gpu_check.sh [GPU_INDEX]
set -euo pipefail
cd "$(dirname "$0")/.."
gpu="${1:-0}"

if ! nvidia-smi -L; then
  echo "gpu_check: no NVIDIA GPU here (nvidia-smi failed)" >&2
  exit 1
fi
# cudarc reads the CUDA version from nvcc; without the toolkit, name it (the driver and
# NVRTC are loaded at run time).
if ! command -v nvcc >/dev/null; then
  export CUDARC_CUDA_VERSION="${CUDARC_CUDA_VERSION:-12080}"
fi
# NVRTC from pip's nvidia-cuda-nvrtc wheel when the toolkit's is not on the loader path.
if ! ldconfig -p 2>/dev/null | grep -q libnvrtc; then
  nvrtc="$(python3 -c 'import nvidia.cuda_nvrtc, os; print(os.path.join(list(nvidia.cuda_nvrtc.__path__)[0], "lib"))' 2>/dev/null || true)"
  if [ -n "$nvrtc" ]; then
    export LD_LIBRARY_PATH="$nvrtc${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"
  else
    echo "gpu_check: NVRTC not found (install the CUDA toolkit or: pip install nvidia-cuda-nvrtc-cu12)" >&2
  fi
fi

# The chosen GPU is the only one the processes see: device cuda (index 0) is it.
export CUDA_VISIBLE_DEVICES="$gpu" MOECAST_TEST_DEVICE=cuda
start=$(date +%s)
echo "== build (release, --features cuda)"
cargo build --release --features cuda
echo "== transformers parity and predictor tests on GPU $gpu"
# One test at a time: CubeCL's random seed is process-wide (see `make test-wgpu`).
cargo test --release --workspace --exclude moecast-ffi --exclude moecast-python \
  --features cuda --test hf_parity --test predictor -- --test-threads=1
echo "== predictor training: Burn on GPU $gpu vs PyTorch on the same GPU"
if ! python3 -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' 2>/dev/null; then
  echo "(PyTorch with CUDA not found: Burn's figures only)"
fi
MOECAST_BENCH_DEVICE=cuda cargo bench --features cuda -p predictor --bench predictor -- train
echo "gpu_check: done in $(( $(date +%s) - start )) s"
