"""Wall time of anytime prediction against the full model, batch 256.

Builds a CIFAR ResNet with auxiliary heads (random weights; the routing
depends only on the heads' confidences), sets thresholds on the benchmark
batch itself so that a chosen share of the samples exits at each head, and
times `predict_on_batch` of the `AnytimeModel` against the full model's
(both compiled `tf.function`s; median of interleaved repeats after warm-up).
Prints the ratio of the median times, measured in this run, next to the
ratio of the multiply-adds the routing needs.

Two routings, each with at least half the samples exiting at head 0:

- `geometric`: MSDNet's shares (ratio 0.5): 1/2, 1/4, 1/8, ... of the
  samples exit at heads 0, 1, 2, ..., the rest at the final head.
- `half-final`: half exit at head 0, the other half go to the final head
  (the least favourable routing with half at head 0).

    python benchmarks/anytime_speed.py              # ResNet-20, 4 heads
    python benchmarks/anytime_speed.py --depth 56 --losses 5 --repeats 20
"""

import argparse
import os
import statistics
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")

import keras  # noqa: E402
import numpy as np  # noqa: E402

from keras_mwbp import anytime  # noqa: E402
from keras_mwbp.anytime.routing import ExitPlan  # noqa: E402
from keras_mwbp.models import cifar_resnet  # noqa: E402


def parse_args():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--depth", type=int, default=20)
    parser.add_argument("--losses", type=int, default=4)
    parser.add_argument("--batch-size", type=int, default=256)
    parser.add_argument("--image-size", type=int, default=32)
    parser.add_argument("--repeats", type=int, default=10)
    parser.add_argument("--warmup", type=int, default=2)
    parser.add_argument("--seed", type=int, default=0)
    return parser.parse_args()


def median_times(functions, x, repeats, warmup):
    """Median wall time of each function on `x`, calls interleaved."""
    for _ in range(warmup):
        for function in functions:
            function(x)
    times = [[] for _ in functions]
    for _ in range(repeats):
        for i, function in enumerate(functions):
            start = time.perf_counter()
            out = function(x)
            keras.ops.convert_to_numpy(keras.tree.flatten(out)[0])
            times[i].append(time.perf_counter() - start)
    return [statistics.median(t) for t in times]


def main():
    args = parse_args()
    keras.utils.set_random_seed(args.seed)
    model = cifar_resnet(
        args.depth, num_losses=args.losses,
        input_shape=(args.image_size, args.image_size, 3),
    )
    rng = np.random.default_rng(args.seed)
    x = rng.normal(size=(args.batch_size, args.image_size, args.image_size,
                         3)).astype("float32")
    y = rng.integers(0, 10, size=args.batch_size)
    plan = ExitPlan(model)
    num_heads = plan.num_heads
    half = [0.5] + [0.0] * (num_heads - 2) + [0.5]
    routings = {
        "geometric": anytime.calibrate(model, (x, y), shares="geometric"),
        "half-final": anytime.calibrate(model, (x, y), shares=half),
    }
    print(
        f"ResNet-{args.depth} with {num_heads} heads, batch "
        f"{args.batch_size} of {args.image_size}x{args.image_size}x3, "
        f"backend {keras.backend.backend()}, {os.cpu_count()} CPU cores"
    )
    print("exit costs (multiply-adds): "
          + ", ".join(f"{c:,}" for c in plan.exit_costs))
    print(f"{'routing':<11} {'exits per head':<22} {'full (s)':>9} "
          f"{'anytime (s)':>12} {'time ratio':>11} {'madds ratio':>12}")
    for name, result in routings.items():
        fast = anytime.AnytimeModel(model, result)
        exits = fast.exit_index(x, batch_size=args.batch_size)
        fractions = np.bincount(exits, minlength=num_heads) / len(x)
        assert fractions[0] >= 0.5, fractions
        full_s, fast_s = median_times(
            [model.predict_on_batch, fast.predict_on_batch], x,
            args.repeats, args.warmup,
        )
        shares = " ".join(f"{f:.0%}" for f in fractions)
        print(f"{name:<11} {shares:<22} {full_s:>9.4f} {fast_s:>12.4f} "
              f"{fast_s / full_s:>10.2f}x "
              f"{result.multiply_adds / plan.exit_costs[-1]:>11.2f}x")


if __name__ == "__main__":
    main()
