"""A quiet start of TensorFlow for the command-line tools.

TensorFlow 2.21 writes C++ log lines while it loads and picks its devices
(oneDNN, CUDA, CPU features), some of them before it reads
`TF_CPP_MIN_LOG_LEVEL`, so that variable alone does not keep them out of a
command's output. `keras-mwbp`, its `calibrate` subcommand and
`python -m experiments.run` import Keras through `import_keras()`, which
filters those lines out of stderr and keeps every other line.
`TF_CPP_MIN_LOG_LEVEL=0` turns the filter off (the user asked for
TensorFlow's logs).

Imports neither TensorFlow nor Keras itself.
"""

import contextlib
import importlib.util
import os
import re
import sys
import tempfile

# TensorFlow's C++ log lines (absl/glog format) and the lines that come with
# them at start-up.
TF_LOG_LINE = re.compile(
    r"^(?:[IWE]\d{4} [\d:.]+ +\d+ [^\]\s]+:\d+\] "
    r"|WARNING: All log messages before absl::InitializeLog\(\) is called "
    r"are written to STDERR"
    r"|To enable the following instructions: .* rebuild TensorFlow with the "
    r"appropriate compiler flags\.)"
)


def _wanted():
    """Whether to filter: not when the user set TF_CPP_MIN_LOG_LEVEL=0."""
    return os.environ.get("TF_CPP_MIN_LOG_LEVEL", "").strip() != "0"


@contextlib.contextmanager
def quiet_start_up():
    """Keeps TensorFlow's C++ start-up log lines out of stderr.

    stderr (the file descriptor) is redirected to a temporary file while
    the block runs; afterwards every line written meanwhile that is not a
    TensorFlow log line (Python warnings, say) is written to stderr. Does
    nothing if stderr is not a real file, or if `TF_CPP_MIN_LOG_LEVEL=0`.
    """
    if not _wanted():
        yield
        return
    try:
        fd = sys.stderr.fileno()
    except (AttributeError, OSError, ValueError):  # No real stderr.
        yield
        return
    sys.stderr.flush()
    saved = os.dup(fd)
    with tempfile.TemporaryFile() as capture:
        os.dup2(capture.fileno(), fd)
        try:
            yield
        finally:
            sys.stderr.flush()
            os.dup2(saved, fd)
            os.close(saved)
            capture.seek(0)
            text = capture.read().decode("utf-8", "replace")
            kept = [
                line for line in text.splitlines(keepends=True)
                if not TF_LOG_LINE.match(line)
            ]
            if kept:
                sys.stderr.write("".join(kept))
                sys.stderr.flush()


def import_keras():
    """Imports and returns `keras`, with TensorFlow started quietly.

    Sets `TF_CPP_MIN_LOG_LEVEL=2` unless it is set (TensorFlow's later INFO
    and WARNING lines), imports Keras (and TensorFlow, on that backend) and
    lists the devices inside `quiet_start_up()`.
    """
    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    with quiet_start_up():
        import keras

        if importlib.util.find_spec("tensorflow") is not None:
            import tensorflow as tf  # Keras's data pipelines use it too.

            tf.config.list_logical_devices()  # Finds the devices now.
    return keras
