#!/usr/bin/env bash
# The project's test command (README, CI): every Keras backend the project
# supports, at both ends of the declared Keras range (pyproject.toml).
#
# Each stage collects the whole suite (tests/) and the tests' markers choose
# what runs on its backend (tests/_backend_selection.py); no list of files
# or test ids is kept here.
#
#   1. TensorFlow, the installed (newest) Keras: every test not marked for
#      other backends alone (unmarked tests run on TensorFlow).
#   2. JAX, the same Keras: the tests marked `backends(..., "jax", ...)`,
#      the reference and backend-neutral behaviour tests.
#   3. PyTorch, the same Keras: the tests marked for "torch".
#   4. The oldest declared Keras (KERAS_OLDEST), layered over the packages
#      of the interpreter that runs the suite: Keras alone is installed (no
#      dependencies) into a directory put first on PYTHONPATH, so the stage
#      sees the same TensorFlow, JAX and torch as the others, in a virtual
#      environment, a conda environment or the system Python alike. It runs
#      the tests marked `oldest_keras` (those that touch Keras internals),
#      on TensorFlow and on PyTorch (`--oldest-keras`).
#
# Set STAGES to a subset of "tensorflow jax torch oldest" to run fewer; extra
# arguments go to every pytest run. Needs `pip install '.[test]'` first;
# stage 4 installs Keras $KERAS_OLDEST (a package install, the only network
# use) into $OLDEST_DIR.
set -euo pipefail
cd "$(dirname "$0")/.."

PYTHON=${PYTHON:-python}
JOBS=${JOBS:-2}
STAGES=${STAGES:-tensorflow jax torch oldest}
KERAS_OLDEST=${KERAS_OLDEST:-3.12.0}
OLDEST_DIR=${OLDEST_DIR:-${TMPDIR:-/tmp}/keras_mwbp-keras-$KERAS_OLDEST}

# JAX's compilation cache in a fresh folder for this run: the tests and
# workers of a run compile the same steps of the same small networks again
# and again (a JAX subset took 108 s without it, 77 s with it). Fresh, so
# that no run reads what an earlier one compiled.
JAX_CACHE=$(mktemp -d "${TMPDIR:-/tmp}/keras_mwbp-jax-cache.XXXXXX")
trap 'rm -rf "$JAX_CACHE"' EXIT
export JAX_COMPILATION_CACHE_DIR=$JAX_CACHE
export JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS=0
export JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES=0

pytest_run() {  # pytest_run PYTHON ARGS...: pytest, in parallel if it can.
  local python=$1
  shift
  local parallel=()
  if [ "$JOBS" -gt 1 ] && "$python" -c "import xdist" 2>/dev/null; then
    parallel=(-n "$JOBS" --dist loadgroup)
  fi
  "$python" -m pytest -p no:cacheprovider -p no:benchmark --durations=15 "${parallel[@]}" "$@"
}

for stage in $STAGES; do
  echo "=== $stage ==="
  case "$stage" in
  tensorflow)
    KERAS_BACKEND=tensorflow pytest_run "$PYTHON" tests "$@"
    ;;
  jax)
    KERAS_BACKEND=jax pytest_run "$PYTHON" tests "$@"
    ;;
  torch)
    KERAS_BACKEND=torch pytest_run "$PYTHON" tests "$@"
    ;;
  oldest)
    export PYTHONPATH="$OLDEST_DIR${PYTHONPATH:+:$PYTHONPATH}"
    if ! "$PYTHON" -c "import keras, sys; sys.exit(keras.__version__ != '$KERAS_OLDEST')" 2>/dev/null; then
      "$PYTHON" -m pip install --quiet --no-deps --upgrade --target "$OLDEST_DIR" "keras==$KERAS_OLDEST"
    fi
    "$PYTHON" -c "import keras; assert keras.__version__ == '$KERAS_OLDEST', keras.__version__"
    for backend in tensorflow torch; do
      KERAS_BACKEND=$backend pytest_run "$PYTHON" --oldest-keras tests "$@"
    done
    ;;
  *)
    echo "unknown stage $stage (use tensorflow, jax, torch, oldest)" >&2
    exit 2
    ;;
  esac
done
