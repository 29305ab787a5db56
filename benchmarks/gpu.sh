#!/usr/bin/env bash
# GPU check of keras_mwbp on JAX: step times of standard, joint and mwbp on
# ResNet-56-5 at batch 128, and a 3-step exactness check against the NumPy
# reference (float64, rtol 1e-5), on a machine with a GPU, JAX (CUDA) and
# PyTorch but no TensorFlow and no network.
#
# Two stages:
#   bash benchmarks/gpu.sh prepare   # here, with PyPI: wheels into
#                                    # benchmarks/wheels (keras, its
#                                    # dependencies, pytest, this project)
#   bash benchmarks/gpu.sh run       # on the GPU machine: installs from
#                                    # benchmarks/wheels only (--no-index)
#
# The run stage downloads nothing. It uses the machine's own jax/jaxlib (with
# CUDA) and numpy through a virtual environment with system site packages.
# Set PYTHON to pick the interpreter; the wheels must be built for its
# version (prepare with the same Python minor version as the GPU machine:
# PYTHON_VERSION=3.11 by default).
set -euo pipefail

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
ROOT=$(cd "$HERE/.." && pwd)
WHEELS=${WHEELS:-$HERE/wheels}
PYTHON=${PYTHON:-python3}
STAGE=${1:-run}

case "$STAGE" in
prepare)
  mkdir -p "$WHEELS"
  PYV=${PYTHON_VERSION:-3.11}
  "$PYTHON" -m pip download --dest "$WHEELS" --only-binary=:all: \
    --python-version "$PYV" --platform manylinux2014_x86_64 \
    --platform manylinux_2_17_x86_64 --platform manylinux_2_28_x86_64 \
    "keras==3.15.1" absl-py namex optree ml-dtypes h5py rich packaging \
    pytest pluggy iniconfig
  "$PYTHON" -m pip wheel --no-deps --wheel-dir "$WHEELS" "$ROOT"
  ls "$WHEELS"
  ;;
run)
  VENV=${VENV:-/tmp/keras-mwbp-gpu}
  "$PYTHON" -m venv --system-site-packages "$VENV"
  # shellcheck disable=SC1091
  . "$VENV/bin/activate"
  python -m pip install --no-index --find-links "$WHEELS" --no-deps \
    "$WHEELS"/*.whl >/dev/null
  python - <<'PY'
import jax
print("jax", jax.__version__, "devices:", jax.devices())
PY
  export KERAS_BACKEND=jax
  cd "$ROOT"
  echo "== step time, ResNet-56-5, batch 128 =="
  python benchmarks/step_time.py --backend jax --depth 56 --losses 5 \
    --batch-size 128 --steps 20 --warmup 3 \
    --rows standard joint mwbp keras-joint floor
  echo "== 3-step exactness on the GPU (NumPy reference, float64) =="
  JAX_ENABLE_X64=1 python -m pytest -q -p no:cacheprovider \
    tests/test_methods_reference.py -k "test_method_matches_reference"
  python -m pytest -q -p no:cacheprovider tests/test_reference.py \
    -k "float32_matches_reference"
  ;;
*)
  echo "usage: $0 prepare|run" >&2
  exit 2
  ;;
esac
