"""Step time and peak memory of `standard`, `joint` and `mwbp` training.

Trains the CIFAR ResNet with auxiliary heads (default: ResNet-56 with 5
losses, heads after layers 15, 25, 35, 45) on random 32x32x3 data, one
method per subprocess so that each peak resident set size (`ru_maxrss`) is
that method's own. A step is one `train_on_batch` call, which returns its
losses as NumPy values and so waits for the step to finish; the first
`--warmup` steps (tracing and graph compilation) are not timed. The table
gives the median step time and the peak memory, and their ratios to `joint`
measured in the same run.

Usage:

    python benchmarks/step_time.py --steps 20 --warmup 3
"""

import argparse
import json
import pathlib
import resource
import statistics
import subprocess
import sys
import time

import keras
import numpy as np
import tensorflow as tf

# Measure the checkout, in this process and in the workers.
sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[1]))

from keras_mwbp.models import cifar_resnet  # noqa: E402
from keras_mwbp.report import format_table  # noqa: E402

# "mwbp-zero": mwbp with nan_policy="zero", which skips the default "raise"
# policy's snapshot of the state and finiteness checks (their cost).
METHODS = ("standard", "joint", "mwbp", "mwbp-zero")
# (key, title, format) of each measurement; `gpu_peak_mib` on a GPU only.
MEASUREMENTS = (
    ("step_s", "step (s)", "{:.3f}"),
    ("peak_rss_mib", "peak RSS (MiB)", "{:,.0f}"),
    ("rss_growth_mib", "RSS growth (MiB)", "{:,.0f}"),
    ("gpu_peak_mib", "GPU peak (MiB)", "{:,.0f}"),
    ("step_peak_mib", "step peak (MiB)", "{:,.0f}"),
)


def peak_rss_mib():
    """Peak resident set size of this process so far, in MiB (Linux)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def measure(method, depth, losses, batch_size, steps, warmup):
    """Trains one method in this process and returns its measurements."""
    keras.utils.set_random_seed(0)
    model = cifar_resnet(
        depth, num_losses=losses, method=method.split("-")[0]
    )
    if method.endswith("-zero"):
        model.nan_policy = "zero"  # Read when the train step is traced.
    model.compile(
        optimizer=keras.optimizers.SGD(0.1, momentum=0.9, nesterov=True),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
    )
    rng = np.random.default_rng(0)
    x = rng.random((batch_size, 32, 32, 3), dtype="float32")
    y = rng.integers(0, 10, size=(batch_size,)).astype("int32")
    gpus = tf.config.list_physical_devices("GPU")
    rss_before = peak_rss_mib()
    for _ in range(warmup):
        model.train_on_batch(x, y)
    device = "GPU:0" if gpus else "CPU:0"
    tf.config.experimental.reset_memory_stats(device)
    times = []
    for _ in range(steps):
        start = time.perf_counter()
        model.train_on_batch(x, y)
        times.append(time.perf_counter() - start)
    rss_after = peak_rss_mib()
    result = {
        "method": method,
        "device": "GPU" if gpus else "CPU",
        "step_s": statistics.median(times),
        "peak_rss_mib": rss_after,
        "rss_growth_mib": rss_after - rss_before,
    }
    # TensorFlow's allocator peak over the timed steps: the step's own
    # tensors, without the one-off tracing and graph-optimization memory
    # that the RSS figures include.
    peak = tf.config.experimental.get_memory_info(device)["peak"] / 2**20
    result["gpu_peak_mib" if gpus else "step_peak_mib"] = peak
    return result


def run_in_subprocess(method, args):
    """Runs `measure` for one method in a fresh Python process."""
    command = [
        sys.executable, __file__, "--worker", method,
        "--steps", str(args.steps), "--warmup", str(args.warmup),
        "--batch-size", str(args.batch_size), "--depth", str(args.depth),
        "--losses", str(args.losses),
    ]
    done = subprocess.run(command, stdout=subprocess.PIPE, text=True, check=True)
    return json.loads(done.stdout.strip().splitlines()[-1])


def with_ratios(results):
    """Adds `"<key>_ratio"`: each measurement divided by `joint`'s."""
    joint = next(r for r in results if r["method"] == "joint")
    keys = [key for key, _, _ in MEASUREMENTS if key in joint]
    return [
        {**r, **{f"{key}_ratio": r[key] / joint[key] for key in keys}}
        for r in results
    ]


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=20,
                        help="timed steps per method")
    parser.add_argument("--warmup", type=int, default=3,
                        help="untimed steps first (tracing, compilation)")
    parser.add_argument("--batch-size", type=int, default=128)
    parser.add_argument("--depth", type=int, default=56)
    parser.add_argument("--losses", type=int, default=5,
                        help="number of heads, final included")
    parser.add_argument("--worker", choices=METHODS, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.steps < 1 or args.warmup < 1:
        parser.error("--steps and --warmup must be at least 1")
    if args.worker:
        print(json.dumps(measure(args.worker, args.depth, args.losses,
                                 args.batch_size, args.steps, args.warmup)))
        return
    results = with_ratios([run_in_subprocess(m, args) for m in METHODS])
    columns = [("method", "method", "{}")]
    for key, title, fmt in MEASUREMENTS:
        if key in results[0]:
            columns += [(key, title, fmt), (f"{key}_ratio", "/ joint", "{:.2f}x")]
    print(
        f"ResNet-{args.depth}, {args.losses} losses, batch {args.batch_size} "
        f"of 32x32x3, median of {args.steps} steps after {args.warmup} "
        f"warm-up steps, {results[0]['device']}"
    )
    print(format_table(results, columns))


if __name__ == "__main__":
    main()
