"""The paper's CIFAR-10 ResNet-56-5 setting (Guo et al. 2020, Tables 1, 6).

`python -m experiments.run cifar10_resnet56 --data-dir DIR [--threads N]`
trains ResNet-56 with 5 losses (heads after layers 15, 25, 35, 45) with
standard BP (heads then trained on the frozen trunk, `train_heads`), Joint
BP, Relay BP and MW-BP, each with the paper's recipe: SGD with Nesterov
momentum 0.9, coupled weight decay 1e-4 in every update (`keras_mwbp.recipe`),
batch 128, 400 epochs, learning rate 0.1
divided by 10 after 40% and 60% of the epochs, nu = 2, standard CIFAR
augmentation. CIFAR-10 must be a prepared tensorflow-datasets copy in DIR
(nothing is downloaded). Each finished method is one JSON file (resumable at
the method level); `table.md` puts the paper's test errors beside the
measured ones. `--synthetic` trains 2 epochs (or `--epochs`) on random
CIFAR-shaped data, to time the setting and check the pipeline: its
accuracies mean nothing.
"""

import math
import os
import sys
import time

from experiments import runner

METHODS = ("standard", "joint", "relay", "mwbp")
# Paper test errors (%), CIFAR-10 ResNet-56-5, Table 6 (model-15 .. model-56;
# the model-56 row is Table 1's).
PAPER_ERRORS = {
    "standard": (63.01, 45.07, 34.01, 13.71, 6.08),
    "joint": (61.37, 40.11, 28.92, 11.56, 5.83),
    "relay": (58.93, 39.47, 27.64, 10.21, 5.77),
    "mwbp": (50.35, 18.94, 9.23, 5.67, 5.53),
}
PAPER_PARAMS = ("0.03M", "0.09M", "0.18M", "0.48M", "0.85M")


def _data(args, batch_size):
    from keras_mwbp import data

    if args.synthetic:
        import numpy as np
        import tensorflow as tf

        rng = np.random.default_rng(0)
        n_train, n_test = 1024, 256
        x = rng.normal(size=(n_train, 32, 32, 3)).astype("float32")
        y = rng.integers(0, 10, n_train).astype("int32")
        xt = rng.normal(size=(n_test, 32, 32, 3)).astype("float32")
        yt = rng.integers(0, 10, n_test).astype("int32")
        train = tf.data.Dataset.from_tensor_slices((x, y)).batch(batch_size)
        test = tf.data.Dataset.from_tensor_slices((xt, yt)).batch(batch_size)
        return train, test, {"num_train": n_train, "num_classes": 10}
    return data.load("cifar10", batch_size=batch_size, data_dir=args.data_dir)


def main(args, results, set_threads):
    """Runs the setting; returns the exit status (2: no data)."""
    if not args.synthetic:
        if args.data_dir is None or not os.path.isdir(args.data_dir):
            print(
                "error: the cifar10_resnet56 study needs a local "
                "tensorflow-datasets copy of CIFAR-10: pass --data-dir DIR "
                "(nothing is downloaded), or --synthetic for a smoke run. "
                f"Received: --data-dir={args.data_dir!r}",
                file=sys.stderr,
            )
            return 2
    epochs = args.epochs or (2 if args.synthetic else 400)
    if epochs < 1:
        print(f"error: `--epochs` must be positive. Received: {epochs}", file=sys.stderr)
        return 2
    methods = [m for m in args.methods.split(",") if m]
    unknown = [m for m in methods if m not in METHODS]
    if unknown or not methods:
        print(f"error: `--methods` must be a comma-separated subset of "
              f"{','.join(METHODS)}. Received: --methods={args.methods!r}",
              file=sys.stderr)
        return 2
    set_threads(args.threads)
    import keras

    from keras_mwbp import recipe
    from keras_mwbp.models import cifar_resnet
    from keras_mwbp.head_training import train_heads

    batch = 128
    try:
        train, test, info = _data(args, batch)
    except (ValueError, ImportError, FileNotFoundError) as error:
        print(f"error: {error}".splitlines()[0], file=sys.stderr)
        return 2
    name = "cifar10_resnet56" + ("_synthetic" if args.synthetic else "")
    folder = os.path.join(results, name)
    steps = math.ceil(info["num_train"] / batch)
    rows = []
    for method in methods:
        config = dict(study=name, method=method, epochs=epochs, batch_size=batch,
                      lr=recipe.LEARNING_RATE, decay_at=list(recipe.LR_DROPS),
                      weight_decay=recipe.WEIGHT_DECAY, coupled_decay=True,
                      nu=recipe.NU,
                      seed=0, synthetic=bool(args.synthetic))
        key = runner.run_key(config)
        path = os.path.join(folder, "runs", f"{key}.json")
        if os.path.exists(path):
            import json

            with open(path) as f:
                rows.append(json.load(f))
            continue
        keras.backend.clear_session()
        keras.utils.set_random_seed(0)
        model = cifar_resnet(56, num_classes=10, num_losses=5, method=method,
                             nu=recipe.NU, weight_decay=recipe.WEIGHT_DECAY)
        model.shuffle_seed = 0
        model.compile(
            optimizer=recipe.sgd(recipe.learning_rate_schedule(steps, epochs)),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            metrics=["accuracy"],
        )
        timer = runner._EpochTimer()
        start = time.perf_counter()
        model.fit(train, epochs=epochs, verbose=2 if not args.synthetic else 0,
                  callbacks=[timer])
        fit_seconds = time.perf_counter() - start
        if method == "standard":
            train_heads(model, train, epochs=epochs,
                        optimizer=recipe.sgd(
                            recipe.learning_rate_schedule(steps, epochs)))
        logs = model.evaluate(test, return_dict=True, verbose=0)
        row = dict(key=key, config=config, fit_seconds=fit_seconds,
                   epoch_seconds=timer.epoch_times,
                   head_names=list(model.output_names),
                   head_depths=[int(d) for d in model.head_depths],
                   test_error=[100 * (1 - float(logs[f"{n}_accuracy"]))
                               for n in model.output_names])
        runner.write_json_atomic(path, row)
        rows.append(row)
        print(f"{name} {method}: errors " + " ".join(f"{e:.2f}" for e in row["test_error"])
              + f"; {fit_seconds:.0f} s", flush=True)
    _table(rows, folder)
    print(f"study {name}: results in {folder}")
    return 0


def _table(rows, folder):
    lines = ["# CIFAR-10 ResNet-56-5: test error (%), measured (paper)", "",
             "| method | " + " | ".join(
                 f"model-{d} ({p})" for d, p in zip((15, 25, 35, 45, 56), PAPER_PARAMS))
             + " | s/epoch |", "|---" * 7 + "|"]
    for row in rows:
        m = row["config"]["method"]
        times = row["epoch_seconds"]
        steady = times[1:] if len(times) > 1 else times
        cells = [f"{e:.2f} ({p:.2f})" for e, p in zip(row["test_error"], PAPER_ERRORS[m])]
        lines.append(f"| {m} | " + " | ".join(cells)
                     + f" | {sum(steady) / len(steady):.1f} |")
    with open(os.path.join(folder, "table.md"), "w") as f:
        f.write("\n".join(lines) + "\n")
