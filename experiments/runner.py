"""One training run of a study, and the store of finished runs.

A run is a dict of settings (its `config`); its key is a hash of the config.
A finished run is one JSON file `runs/<key>.json` in the study's folder,
written atomically (a temporary file, then `os.replace`), so an interrupted
study redoes only the runs that have no file. A run finished by another
study with the same config (same key) is copied, not redone.
"""

import glob
import hashlib
import json
import math
import os
import tempfile
import time
import traceback

import numpy as np

# Final-head test accuracy below which a run counts as failed (stated in
# docs/results.md): chance is 10%; trained runs reach far above this.
FAIL_THRESHOLD = 0.5


def run_key(config):
    text = json.dumps(config, sort_keys=True)
    return hashlib.sha1(text.encode()).hexdigest()[:16]


def write_json_atomic(path, obj):
    folder = os.path.dirname(path)
    os.makedirs(folder, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp_", suffix=".json")
    try:
        with os.fdopen(fd, "w") as f:
            json.dump(obj, f, indent=1, sort_keys=True)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.remove(tmp)
        raise


def find_finished(results_root, study, key):
    """The finished row of `key`: this study's, or another study's copy."""
    own = os.path.join(results_root, study, "runs", f"{key}.json")
    if os.path.exists(own):
        with open(own) as f:
            return json.load(f), False
    for path in glob.glob(os.path.join(results_root, "*", "runs", f"{key}.json")):
        with open(path) as f:
            row = json.load(f)
        write_json_atomic(own, row)
        return row, True
    return None, False


_DATA = {}


def load_data(name, num_train):
    """`(x_train, y_train), (x_test, y_test)` NumPy arrays."""
    if (name, num_train) in _DATA:
        return _DATA[(name, num_train)]
    from keras_mwbp import data

    if name == "mnist1d":
        (x, y), test = data._make_mnist1d(as_images=False)
    elif name == "digits":
        (x, y), test = data.load_digits(seed=0)
    else:
        raise ValueError(f"unknown dataset {name!r}")
    if num_train and num_train < len(y):
        x, y = x[:num_train], y[:num_train]
    _DATA[(name, num_train)] = ((x, y), test)
    return _DATA[(name, num_train)]


def _optimizer(config, steps_per_epoch, epochs):
    """The recipe's SGD (`keras_mwbp.recipe`) with the config's schedule."""
    from keras_mwbp import recipe

    return recipe.sgd(recipe.learning_rate_schedule(
        steps_per_epoch,
        epochs,
        peak=config["lr"],
        drops=config["decay_at"],
        warmup_epochs=config["warmup_epochs"],
    ))


def _EpochTimer():
    """A Keras callback recording each epoch's wall time (`epoch_times`)."""
    import keras

    class EpochTimer(keras.callbacks.Callback):
        def __init__(self):
            super().__init__()
            self.epoch_times = []

        def on_epoch_begin(self, epoch, logs=None):
            self._start = time.perf_counter()

        def on_epoch_end(self, epoch, logs=None):
            self.epoch_times.append(time.perf_counter() - self._start)

    return EpochTimer()


def _build(config, input_shape):
    """The config's network: the zoo's CIFAR ResNet (1-D for MNIST-1D) with
    stage widths `width, 2 width, 4 width`, the paper's head placement and
    type-A heads. Configs written before `weighting` and `weight_decay`
    existed mean "paper" and 0."""
    from keras_mwbp.models import cifar_resnet

    nu = config["nu"]
    head_weights = None
    nu_value = 2.0
    if nu in ("adaptive-I", "adaptive-II"):
        nu_value = 0.5 if nu == "adaptive-I" else 2.0
    elif float(nu) == 0.0:
        # nu must be positive; nu = 0 of Eq. 5 is every gamma_i = 1.
        head_weights = [1.0] * config["num_losses"]
    else:
        nu_value = float(nu)
    return cifar_resnet(
        config["depth"],
        num_losses=config["num_losses"],
        input_shape=input_shape,
        width=config["width"],
        method=config["method"],
        nu=nu_value,
        head_weights=head_weights,
        shuffle_seed=config["seed"],
        weighting=config.get("weighting", "paper"),
        weight_decay=config.get("weight_decay", 0.0),
    )


def _same_but_seed(configs):
    def strip(c):
        return {k: v for k, v in c.items() if k != "seed"}

    return all(strip(c) == strip(configs[0]) for c in configs)


def execute_group(configs, on_row):
    """Trains the runs of `configs` (equal but for the seed) one by one.

    The model is built and compiled once (one trace of the train step);
    for each seed its weights are set to those a fresh model built after
    `keras.utils.set_random_seed(seed)` starts from, its optimizer state
    (step counters, momenta) is zeroed and its `shuffle_seed` set to the
    seed: the same start and data order as a fresh model of that seed.
    `on_row(row)` gets each finished row.

    A run that raises (for instance a non-finite loss under
    `nan_policy="raise"`) gives a failed row with the error, never dropped.
    """
    import keras

    from keras_mwbp.callbacks import AdaptiveNu
    from keras_mwbp.head_training import train_heads

    if not configs:
        return
    if not _same_but_seed(configs):
        raise ValueError("configs of a group must differ only in `seed`")
    first = configs[0]
    keras.backend.clear_session()
    (x, y), (x_test, y_test) = load_data(first["dataset"], first["num_train"])
    epochs, batch = first["epochs"], first["batch_size"]
    steps = math.ceil(len(y) / batch)
    keras.utils.set_random_seed(first["seed"])
    model = _build(first, x.shape[1:])
    model.compile(
        optimizer=_optimizer(first, steps, epochs),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    names = list(model.output_names)
    depths = [int(d) for d in model.head_depths]
    params = [int(model.exit_model(i).count_params()) for i in range(len(names))]
    for position, config in enumerate(configs):
        if position > 0:
            keras.utils.set_random_seed(config["seed"])
            fresh = _build(config, x.shape[1:])
            model.set_weights(fresh.get_weights())
            del fresh
            for variable in model.optimizer.variables:
                variable.assign(keras.ops.zeros_like(variable))
            model.shuffle_seed = config["seed"]
        callbacks = [_EpochTimer()]
        if config["nu"] in ("adaptive-I", "adaptive-II"):
            callbacks.append(AdaptiveNu(
                config["nu"].split("-")[1],
                boundaries=sorted({int(round(f * epochs))
                                   for f in config["decay_at"]}),
            ))
        row = {"key": run_key(config), "config": config, "error": None,
               "head_names": names, "head_depths": depths, "head_params": params,
               "compiled_for_seed": first["seed"]}
        start = time.perf_counter()
        try:
            history = model.fit(
                x, y, batch_size=batch, epochs=epochs, verbose=0,
                callbacks=callbacks,
            )
            row["train_loss"] = [float(v) for v in history.history["loss"]]
        except Exception as error:  # noqa: BLE001 - recorded, never dropped
            row["error"] = f"{type(error).__name__}: {error}"[:500]
            row["traceback"] = traceback.format_exc()[-2000:]
        row["fit_seconds"] = time.perf_counter() - start
        times = callbacks[0].epoch_times
        steady = times[1:] if len(times) > 1 else times
        row["epoch_seconds"] = float(np.mean(steady)) if steady else float("nan")
        row["first_epoch_seconds"] = times[0] if times else float("nan")
        row["step_seconds"] = row["epoch_seconds"] / steps
        row["steps_per_epoch"] = steps
        row["head_train_seconds"] = 0.0
        try:
            if (row["error"] is None and config["method"] == "standard"
                    and len(names) > 1):
                start = time.perf_counter()
                train_heads(
                    model,
                    (x, y),
                    epochs=config["head_epochs"],
                    optimizer=_optimizer(config, steps, config["head_epochs"]),
                    batch_size=batch,
                    shuffle_seed=config["seed"],
                    weight_decay=config.get("weight_decay", 0.0),
                )
                row["head_train_seconds"] = time.perf_counter() - start
            if row["error"] is None:
                outputs = model.predict(x_test, batch_size=256, verbose=0)
                if len(names) == 1:
                    outputs = [outputs]
                acc = [float(np.mean(np.argmax(o, axis=1) == y_test))
                       for o in outputs]
                # Proof of convergence: each head's accuracy on the training
                # set at the end (inference mode).
                fitted = model.predict(x, batch_size=256, verbose=0)
                if len(names) == 1:
                    fitted = [fitted]
                row["train_accuracy"] = [
                    float(np.mean(np.argmax(o, axis=1) == y)) for o in fitted
                ]
        except Exception as error:  # noqa: BLE001 - recorded, never dropped
            row["error"] = f"{type(error).__name__}: {error}"[:500]
            row["traceback"] = traceback.format_exc()[-2000:]
        if row["error"] is not None:
            acc = [float("nan")] * len(names)
        row["test_accuracy"] = acc
        row["failed"] = bool(not (acc[-1] >= FAIL_THRESHOLD))
        on_row(row)
