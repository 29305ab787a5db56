"""Atomic file writes: a crash while writing leaves the previous file intact.

Keras writes `.keras` and `.weights.h5` files in place, so a process killed
half way through a save leaves a truncated file where the last good
checkpoint was. `atomic_path` hands out a temporary name in the same folder
and renames it over the target only once the file is complete and flushed to
disk (`os.replace` is atomic on POSIX and Windows within one file system).
"""

import contextlib
import os
import tempfile


@contextlib.contextmanager
def atomic_path(path):
    """Yields a temporary path to write; it replaces `path` on success.

    The temporary file lies beside `path` (same folder, same suffix, so
    Keras accepts it as a `.keras` or `.weights.h5` name). If the body raises
    or the process dies, `path` keeps its previous content and the temporary
    file is removed (or, after a hard kill, left behind under a name starting
    with `.tmp-`).

    Args:
        path: The file to (re)write.

    Example:

    ```python
    with atomic_path("model.keras") as tmp:
        model.save(tmp)
    ```
    """
    path = os.fspath(path)
    folder = os.path.dirname(os.path.abspath(path))
    name = os.path.basename(path)
    suffix = ".keras" if name.endswith(".keras") else ""
    if name.endswith(".weights.h5"):
        suffix = ".weights.h5"
    elif not suffix:
        suffix = os.path.splitext(name)[1]
    os.makedirs(folder, exist_ok=True)
    handle, tmp = tempfile.mkstemp(prefix=f".tmp-{name}-", suffix=suffix,
                                   dir=folder)
    os.close(handle)
    os.remove(tmp)  # Writers such as h5py want to create the file.
    try:
        yield tmp
        _fsync(tmp)
        os.replace(tmp, path)
        _fsync_folder(folder)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def check_writable_dir(path, what):
    """Makes sure files can be written into folder `path`, creating it.

    Callbacks call this when training begins, so that a folder that cannot
    hold their files fails at once rather than at the first save, after
    minutes of training. The test is a real one: a temporary file is created
    in the folder and removed (permission bits do not stop root, a read-only
    file system does).

    Args:
        path: The folder (created, with its parents, if missing).
        what: What the folder is for, for the message, e.g.
            ``"`backup_dir`"``.

    Raises:
        NotADirectoryError: If `path`, or a folder above it, is a file.
        PermissionError: If a file cannot be created there (its message
            names `path` and the reason).
        OSError: If the folder cannot be created for another reason.
    """
    path = os.fspath(path)
    parent = os.path.abspath(path)
    while not os.path.exists(parent) and os.path.dirname(parent) != parent:
        parent = os.path.dirname(parent)
    if os.path.exists(parent) and not os.path.isdir(parent):
        where = "is a file" if parent == os.path.abspath(path) else (
            f"lies under {parent!r}, which is a file")
        raise NotADirectoryError(
            f"{what} {path!r} cannot hold files: it {where}, not a directory"
        )
    try:
        os.makedirs(path, exist_ok=True)
        handle, probe = tempfile.mkstemp(prefix=".tmp-write-check-", dir=path)
        os.close(handle)
        os.remove(probe)
    except OSError as error:
        reason = error.strerror or str(error)
        failure = type(error)(f"{what} {path!r} is not writable: {reason}")
        failure.errno = error.errno
        raise failure from None


def atomic_write_text(path, text):
    """Writes `text` to `path` atomically (see `atomic_path`)."""
    with atomic_path(path) as tmp:
        with open(tmp, "w", encoding="utf-8") as f:
            f.write(text)


def _fsync(path):
    with open(path, "rb") as f:
        os.fsync(f.fileno())


def _fsync_folder(folder):
    if os.name != "posix":
        return
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def save_model(model, filepath, overwrite=True, **kwargs):
    """Saves `model` like `keras.saving.save_model`, atomically.

    The model is written to a temporary file beside `filepath` (see
    `atomic_path`) and renamed over it once complete, so a crash or an error
    during the save leaves the previous file at `filepath` as it was. Remote
    paths (`gs://...`, `hf://...`), file objects and `zipped=False`
    directories cannot be renamed into place; they are saved by Keras as they
    are (not atomically).

    Args:
        model: A Keras model.
        filepath: Where to save it, a `.keras` file (or a legacy `.h5` file).
        overwrite: Whether to replace an existing file without asking
            (`False` asks, as Keras does).
        **kwargs: Other `keras.saving.save_model` arguments.

    Example:

    ```python
    keras_mwbp.saving.save_model(model, "model.keras")
    model = keras.saving.load_model("model.keras")
    ```
    """
    import keras
    from keras_mwbp._compat import file_utils
    from keras_mwbp._compat import io_utils

    if (
        not isinstance(filepath, (str, os.PathLike))
        or file_utils.is_remote_path(filepath)
        or str(filepath).startswith("hf://")
        or kwargs.get("zipped") is False
    ):
        keras.saving.save_model(model, filepath, overwrite=overwrite, **kwargs)
        return
    if (
        not overwrite
        and os.path.exists(filepath)
        and not io_utils.ask_to_proceed_with_overwrite(str(filepath))
    ):
        return
    with atomic_path(filepath) as tmp:
        keras.saving.save_model(model, tmp, overwrite=True, **kwargs)
