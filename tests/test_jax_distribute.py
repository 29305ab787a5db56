"""`MultiWayModel` under `keras.distribution.DataParallel` on JAX.

Two host CPU devices (`XLA_FLAGS=--xla_force_host_platform_device_count=2`,
set before JAX starts, so the run is a child process) hold half of each
global batch; the training equals one device's on the same global batch.
"""

import json
import os
import pathlib
import subprocess
import sys
import textwrap

import pytest

pytestmark = pytest.mark.backends("tensorflow", "jax")

pytest.importorskip("jax")

SCRIPT = textwrap.dedent(
    """
    import json
    import sys
    import numpy as np
    import jax
    import keras
    sys.path.insert(0, "tests")  # The child runs in the repository root.
    from _distribution_case import build, compile, data, train

    x, y = data()
    result = {"devices": len(jax.devices())}
    for method in ("mwbp", "joint"):
        keras.distribution.set_distribution(None)
        keras.utils.set_random_seed(0)
        single = build(method, batch_norm=True)
        initial = single.get_weights()
        compile(single)
        single_history = train(single, x, y)
        keras.distribution.set_distribution(
            keras.distribution.DataParallel(devices=jax.devices()))
        parallel = build(method, batch_norm=True)
        parallel.set_weights(initial)
        compile(parallel)
        parallel_history = train(parallel, x, y)
        # The parallel model's kernel really is replicated, its batch split.
        result[method] = {
            "weight_diff": max(
                float(np.max(np.abs(a - b))) for a, b in
                zip(single.get_weights(), parallel.get_weights())),
            "moved": max(
                float(np.max(np.abs(a - b))) for a, b in
                zip(single.get_weights(), initial)),
            "kernel_devices": len(
                parallel.get_layer("d1").kernel.value.sharding.device_set),
            "single": single_history,
            "parallel": parallel_history,
            "iterations": int(parallel.optimizer.iterations.numpy()),
            "inner_iterations": [int(o.iterations.numpy()) for o in
                                 parallel.optimizer.loss_optimizers],
        }
    print(json.dumps(result))
    """
)


def test_data_parallel_matches_single_device():
    """MW-BP (and Joint BP) on two devices, each with half of every batch,
    trains exactly like one device: same weights, BatchNorm statistics,
    per-loss optimizer step counts and global logs."""
    env = dict(
        os.environ,
        KERAS_BACKEND="jax",
        XLA_FLAGS="--xla_force_host_platform_device_count=2",
        TF_CPP_MIN_LOG_LEVEL="3",
    )
    env.pop("JAX_ENABLE_X64", None)
    completed = subprocess.run(
        [sys.executable, "-c", SCRIPT],
        cwd=pathlib.Path(__file__).resolve().parents[1],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
        check=True,
    )
    result = json.loads(completed.stdout.strip().splitlines()[-1])
    assert result["devices"] == 2
    for method, num_losses in (("mwbp", 2), ("joint", 1)):
        run = result[method]
        assert run["kernel_devices"] == 2
        assert run["moved"] > 1e-2
        assert run["weight_diff"] < 1e-5, method
        assert run["iterations"] == 4
        assert run["inner_iterations"] == [4] * num_losses
        assert set(run["parallel"]) == set(run["single"]) == {
            "loss", "aux_loss", "final_loss", "aux_accuracy",
            "final_accuracy", "nu", "gamma_0", "gamma_1",
        }
        for key, values in run["single"].items():
            for single, parallel in zip(values, run["parallel"][key]):
                assert abs(single - parallel) < 1e-5, (method, key)
