"""Step time and peak memory of `standard`, `joint` and `mwbp`, per backend.

Trains the CIFAR ResNet with auxiliary heads (default: ResNet-56 with 5
losses, heads after layers 15, 25, 35, 45) on random 32x32x3 data. Every row
runs in its own subprocess, under the Keras backend it names
(`KERAS_BACKEND`), so each peak resident set size (`ru_maxrss`) is that
row's own. A step is one `train_on_batch` call, which returns its losses as
NumPy values and so waits for the step to finish; the first `--warmup` steps
(tracing and compilation) are not timed. Rows:

- `standard`, `joint`, `mwbp`: `MultiWayModel` with that method (nan_policy
  "raise", the default); `mwbp-zero`: mwbp with nan_policy "zero" (no
  snapshot and checks).
- `keras-joint`: plain Keras Joint BP, a `keras.Model` with the same outputs
  compiled with `loss_weights` = the gammas.
- `authors-mwbp`, `authors-joint` (PyTorch only): the authors' training loop
  in plain PyTorch (`benchmarks/authors_loop.py`: the same network, one
  forward pass and `backward(retain_graph=True)` per loss, parameters written
  through `.data`; exact MW-BP on this network, `tests/test_authors_loop.py`),
  with the same SGD.
- The floor of an exact MW-BP step, `F + sum_i B_i`: `F` is one training-mode
  forward pass, `B_i` loss i's backward pass alone (forward plus backward of
  loss i, minus `F`), each a compiled function of the backend (on PyTorch,
  eager autograd, as Keras's torch trainer runs) timed in the same run, in
  interleaved rounds (each B_i against its own round's F). Every exact
  implementation pays at least this.

Ratios are to `joint` (and mwbp to the floor) on the same backend, from the
same run.

Usage:

    python benchmarks/step_time.py --backend tensorflow jax --steps 10
    python benchmarks/step_time.py --backend jax --depth 20 --batch-size 32
"""

import argparse
import json
import os
import pathlib
import resource
import statistics
import subprocess
import sys
import time

ROOT = pathlib.Path(__file__).resolve().parents[1]
BACKENDS = ("tensorflow", "jax", "torch")
ROWS = ("standard", "joint", "mwbp", "mwbp-zero", "keras-joint",
        "authors-mwbp", "authors-joint", "floor")


def peak_rss_mib():
    """Peak resident set size of this process so far, in MiB (Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def _median_time(function, steps, warmup):
    for _ in range(warmup):
        function()
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        function()
        times.append(time.perf_counter() - start)
    return statistics.median(times)


def _model_and_data(args, method):
    import keras
    import numpy as np

    from keras_mwbp.models import cifar_resnet

    keras.utils.set_random_seed(0)
    model = cifar_resnet(args.depth, num_losses=args.losses, method=method)
    rng = np.random.default_rng(0)
    x = rng.random((args.batch_size, 32, 32, 3), dtype="float32")
    y = rng.integers(0, 10, size=(args.batch_size,)).astype("int32")
    return model, x, y


def _optimizer():
    import keras

    return keras.optimizers.SGD(0.1, momentum=0.9, nesterov=True)


def _loss():
    import keras

    return keras.losses.SparseCategoricalCrossentropy(from_logits=True)


def measure(row, args):
    """Measures one row in this process."""
    import keras

    rss_before = peak_rss_mib()
    result = {"row": row, "backend": keras.backend.backend()}
    if row == "floor":
        result.update(measure_floor(args))
        return result
    method = {"keras-joint": "joint", "authors-mwbp": "mwbp",
              "authors-joint": "joint"}.get(row, row.split("-")[0])
    model, x, y = _model_and_data(args, method)
    if row.startswith("authors-"):
        step = authors_loop_step(method, model, x, y, args)
        del model
    elif row == "keras-joint":
        plain = keras.Model(model.inputs, model.outputs)
        plain.compile(optimizer=_optimizer(),
                      loss=[_loss()] * model.num_heads,
                      loss_weights=list(model.head_weights))
        labels = [y] * model.num_heads

        def step():
            plain.train_on_batch(x, labels)
    else:
        if row.endswith("-zero"):
            model.nan_policy = "zero"  # Read when the step is traced.
        model.compile(optimizer=_optimizer(), loss=_loss())

        def step():
            model.train_on_batch(x, y)

    result["step_s"] = _median_time(step, args.steps, args.warmup)
    result["peak_rss_mib"] = peak_rss_mib()
    result["rss_growth_mib"] = result["peak_rss_mib"] - rss_before
    return result


def authors_loop_step(method, reference, x, y, args):
    """A step of the authors' loop in plain PyTorch on the network of the
    Keras model `reference` (checked by its parameter count), same data."""
    import keras

    if keras.backend.backend() != "torch":
        raise SystemExit("the authors' loop rows run on --backend torch only")
    sys.path.insert(0, str(pathlib.Path(__file__).parent))
    import authors_loop

    from keras_mwbp.models.cifar_resnet import CIFAR_RESNET_PRESETS
    from keras_mwbp.models.taps import official_taps

    blocks = CIFAR_RESNET_PRESETS[args.depth]
    step, network = authors_loop.make_step(
        method, blocks, official_taps(3 * blocks, args.losses),
        [float(g) for g in reference.head_weights], x, y)
    sizes = sum(p.numel() for p in network.parameters())
    expected = sum(int(v.numpy().size) for v in reference.trainable_variables)
    if sizes != expected:
        raise SystemExit(f"the authors' network has {sizes} parameters, the "
                         f"Keras one {expected}")
    return step


def measure_floor(args):
    """`F` and each `B_i` with the backend's own compiled functions."""
    import keras

    model, x, y = _model_and_data(args, "mwbp")
    loss = _loss()
    backend = keras.backend.backend()
    heads = range(model.num_heads)
    if backend == "tensorflow":
        import tensorflow as tf

        x, y = tf.constant(x), tf.constant(y)
        compile_options = {"jit_compile": False}
        forward = tf.function(lambda: model(x, training=True),
                              **compile_options)

        def backward_of(i):
            variables = model._head_graph.loss_variables[i]

            @tf.function(**compile_options)
            def run():
                with tf.GradientTape() as tape:
                    value = loss(y, model(x, training=True)[i])
                return tape.gradient(value, variables)

            return run

        def wait(value):
            return tf.nest.map_structure(lambda t: t.numpy(), value)
    elif backend == "jax":
        import jax

        trainable = [v.value for v in model.trainable_variables]
        non_trainable = [v.value for v in model.non_trainable_variables]

        @jax.jit
        def forward_fn(trainable, non_trainable):
            return model.stateless_call(trainable, non_trainable, x,
                                        training=True)

        def forward():
            return forward_fn(trainable, non_trainable)

        def backward_of(i):
            def loss_i(trainable):
                outputs, _ = model.stateless_call(
                    trainable, non_trainable, x, training=True)
                return loss(y, outputs[i])

            grad = jax.jit(jax.grad(loss_i))
            return lambda: grad(trainable)

        wait = jax.block_until_ready
    elif backend == "torch":
        import torch

        x = keras.ops.convert_to_tensor(x)
        y = keras.ops.convert_to_tensor(y)

        def forward():  # Recorded for autograd, as a training step's is.
            return model(x, training=True)

        def backward_of(i):
            variables = [v.value for v in model._head_graph.loss_variables[i]]

            def run():
                value = loss(y, model(x, training=True)[i])
                return torch.autograd.grad(value, variables)

            return run

        def wait(value):  # Eager on the CPU: done when it returns.
            return value
    else:
        raise SystemExit(f"no floor measurement for backend {backend!r}")
    # Interleaved rounds (F, then each loss's forward + backward), each B_i
    # against the F of its own round, so a drift in the machine's speed
    # over the measurement does not land on one term.
    runs = [forward] + [backward_of(i) for i in heads]
    for _ in range(args.warmup):
        for run in runs:
            wait(run())
    rounds = []
    for _ in range(args.steps):
        times = []
        for run in runs:
            start = time.perf_counter()
            wait(run())
            times.append(time.perf_counter() - start)
        rounds.append(times)
    forward_s = statistics.median(r[0] for r in rounds)
    backward_s = [
        max(0.0, statistics.median(r[i + 1] - r[0] for r in rounds))
        for i in heads
    ]
    return {
        "forward_s": forward_s,
        "backward_s": backward_s,
        "step_s": forward_s + sum(backward_s),
    }


def run_in_subprocess(backend, row, args):
    """Runs `measure` for one row in a fresh Python process."""
    command = [
        sys.executable, __file__, "--worker", row,
        "--steps", str(args.steps), "--warmup", str(args.warmup),
        "--batch-size", str(args.batch_size), "--depth", str(args.depth),
        "--losses", str(args.losses),
    ]
    env = dict(os.environ, KERAS_BACKEND=backend, TF_CPP_MIN_LOG_LEVEL="3")
    env["PYTHONPATH"] = os.pathsep.join(
        [str(ROOT)] + [p for p in [os.environ.get("PYTHONPATH")] if p])
    done = subprocess.run(command, stdout=subprocess.PIPE, text=True,
                          check=True, env=env)
    return json.loads(done.stdout.strip().splitlines()[-1])


def table(rows, columns):
    """Aligned text table of dicts; `columns` = (key, title, format)."""
    cells = [[title for _, title, _ in columns]]
    for row in rows:
        cells.append([
            "-" if row.get(key) is None else fmt.format(row[key])
            for key, _, fmt in columns
        ])
    widths = [max(len(r[i]) for r in cells) for i in range(len(columns))]
    return "\n".join(
        "  ".join(c.ljust(w) if i == 0 else c.rjust(w)
                  for i, (c, w) in enumerate(zip(r, widths)))
        for r in cells
    )


def report(backend, results):
    by_row = {r["row"]: r for r in results}
    joint = by_row.get("joint")
    floor = by_row.get("floor")
    for r in results:
        if joint:
            r["step_ratio"] = r["step_s"] / joint["step_s"]
            if "peak_rss_mib" in r:
                r["rss_ratio"] = r["peak_rss_mib"] / joint["peak_rss_mib"]
        if floor and r["row"] != "floor":
            r["floor_ratio"] = r["step_s"] / floor["step_s"]
    lines = [table(
        [r for r in results if r["row"] != "floor"],
        [("row", "method", "{}"), ("step_s", "step (s)", "{:.3f}"),
         ("step_ratio", "/ joint", "{:.2f}x"),
         ("floor_ratio", "/ floor", "{:.2f}x"),
         ("peak_rss_mib", "peak RSS (MiB)", "{:,.0f}"),
         ("rss_ratio", "/ joint", "{:.2f}x")],
    )]
    if floor:
        backward = ", ".join(f"{b:.3f}" for b in floor["backward_s"])
        lines.append(
            f"floor F + sum B_i = {floor['forward_s']:.3f} + "
            f"({backward}) = {floor['step_s']:.3f} s"
            + (f"; mwbp / floor = {by_row['mwbp']['floor_ratio']:.2f}x"
               if "mwbp" in by_row else "")
            + (f"; joint / keras-joint = "
               f"{joint['step_s'] / by_row['keras-joint']['step_s']:.2f}x"
               if joint and "keras-joint" in by_row else "")
        )
    against_authors = [
        f"{row} / authors-{row} = "
        f"{by_row[row]['step_s'] / by_row['authors-' + row]['step_s']:.2f}x"
        for row in ("mwbp", "joint")
        if row in by_row and f"authors-{row}" in by_row
    ]
    if against_authors:
        lines.append("; ".join(against_authors))
    return f"backend {backend}\n" + "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--backend", nargs="+", choices=BACKENDS,
                        default=["tensorflow"])
    parser.add_argument("--rows", nargs="+", choices=ROWS,
                        default=["standard", "joint", "mwbp", "keras-joint",
                                 "authors-mwbp", "authors-joint", "floor"],
                        help="rows to measure (the authors' loop rows only "
                        "on torch)")
    parser.add_argument("--steps", type=int, default=10,
                        help="timed steps per row")
    parser.add_argument("--warmup", type=int, default=2,
                        help="untimed steps first (tracing, compilation)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--depth", type=int, default=56)
    parser.add_argument("--losses", type=int, default=5,
                        help="number of heads, final included")
    parser.add_argument("--json", help="also write the results to this file")
    parser.add_argument("--worker", choices=ROWS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.steps < 1 or args.warmup < 1:
        parser.error("--steps and --warmup must be at least 1")
    if args.worker:
        print(json.dumps(measure(args.worker, args)))
        return
    print(
        f"ResNet-{args.depth}, {args.losses} losses, batch {args.batch_size} "
        f"of 32x32x3, median of {args.steps} steps after {args.warmup} "
        "warm-up steps"
    )
    everything = {}
    for backend in args.backend:
        results = [run_in_subprocess(backend, row, args) for row in args.rows
                   if backend == "torch" or not row.startswith("authors-")]
        everything[backend] = results
        print(report(backend, results), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(everything, f, indent=1)


if __name__ == "__main__":
    main()
