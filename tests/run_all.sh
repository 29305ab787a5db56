#!/usr/bin/env bash
# The project's test command (README, CI): every Keras backend the project
# supports, at both ends of the declared Keras range (pyproject.toml).
#
#   1. TensorFlow, the installed (newest) Keras: the whole suite.
#   2. JAX, the same Keras: the tests of backend-neutral behaviour
#      (JAX_FILES; TensorFlow-only tests inside them skip themselves).
#   3. PyTorch, the same Keras: the reference and behaviour tests
#      (TORCH_FILES).
#   4. TensorFlow, the oldest declared Keras (KERAS_OLDEST), layered over
#      the packages of the interpreter that runs the suite: Keras alone is
#      installed (no dependencies) into a directory put first on PYTHONPATH,
#      so the stage sees the same TensorFlow, JAX and torch as the others,
#      in a virtual environment, a conda environment or the system Python
#      alike. It runs the tests that touch Keras internals (OLDEST_FILES),
#      and the torch step's tests under PyTorch.
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

JAX_FILES=(
  tests/test_jax_step.py tests/test_jax_distribute.py
  tests/test_reference.py
  tests/test_methods_reference.py tests/test_learning_rate.py
  tests/test_loss_scaling.py tests/test_regressions_issue9.py
  tests/test_nan_policy.py
  # BackupAndRestore on JAX: the step-exact resume and the checks that
  # touch the model (the rest of the file is backend-neutral file logic).
  tests/test_backup_and_restore.py::test_resume_mid_epoch_equals_uninterrupted_run
  tests/test_backup_and_restore.py::test_backup_of_another_model_is_refused_before_any_change
  tests/test_backup_and_restore.py::test_backup_records_what_defines_the_position
  tests/test_backup_and_restore.py::test_request_stop_backs_up_the_batch_and_resumes_exactly
  tests/test_backup_and_restore.py::test_rerun_after_the_last_backup_restores_state_and_history
  tests/test_skip_step_logs.py
  tests/test_label_values.py tests/test_loss_names.py
  tests/test_authors_loop.py tests/test_custom_objects.py
  tests/test_fused_activation.py
)
TORCH_FILES=(
  tests/test_torch_step.py tests/test_torch_vjp.py
  tests/test_reference.py
  tests/test_methods_reference.py tests/test_learning_rate.py
  tests/test_loss_scaling.py tests/test_regressions_issue9.py
  tests/test_nan_policy.py tests/test_backup_and_restore.py
  tests/test_skip_step_logs.py
  tests/test_label_values.py tests/test_loss_names.py
  tests/test_authors_loop.py tests/test_custom_objects.py
  tests/test_fused_activation.py
)
OLDEST_FILES=(
  tests/test_keras_versions.py tests/test_zoo.py tests/test_reference.py
  tests/test_methods_reference.py tests/test_learning_rate.py
  tests/test_loss_scaling.py tests/test_progbar_logger.py
  tests/test_multi_way_optimizer.py tests/test_safe_loading.py
  tests/test_multi_worker.py tests/test_custom_objects.py
  tests/test_fused_activation.py
)

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
    KERAS_BACKEND=tensorflow pytest_run "$PYTHON" "$@"
    ;;
  jax)
    KERAS_BACKEND=jax pytest_run "$PYTHON" "${JAX_FILES[@]}" "$@"
    ;;
  torch)
    KERAS_BACKEND=torch pytest_run "$PYTHON" "${TORCH_FILES[@]}" "$@"
    ;;
  oldest)
    export PYTHONPATH="$OLDEST_DIR${PYTHONPATH:+:$PYTHONPATH}"
    if ! "$PYTHON" -c "import keras, sys; sys.exit(keras.__version__ != '$KERAS_OLDEST')" 2>/dev/null; then
      "$PYTHON" -m pip install --quiet --no-deps --upgrade --target "$OLDEST_DIR" "keras==$KERAS_OLDEST"
    fi
    "$PYTHON" -c "import keras; assert keras.__version__ == '$KERAS_OLDEST', keras.__version__"
    KERAS_BACKEND=tensorflow pytest_run "$PYTHON" "${OLDEST_FILES[@]}" "$@"
    # The torch step's use of Keras internals, the backend-neutral naming
    # of torch's optimizer subclasses (_compat), and the hand-written VJPs
    # against Keras's own layers, on the oldest Keras.
    KERAS_BACKEND=torch pytest_run "$PYTHON" \
      tests/test_torch_step.py tests/test_torch_vjp.py tests/test_custom_objects.py "$@"
    ;;
  *)
    echo "unknown stage $stage (use tensorflow, jax, torch, oldest)" >&2
    exit 2
    ;;
  esac
done
