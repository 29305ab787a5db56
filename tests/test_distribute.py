"""`MultiWayModel` under a `tf.distribute.MirroredStrategy` scope.

The strategy needs two logical CPU devices, which must be configured before
TensorFlow initializes, so the training runs in a child process.
"""

import json
import pathlib
import subprocess
import sys
import textwrap

from conftest import tensorflow_only

SCRIPT = textwrap.dedent(
    """
    import json, os, sys
    os.environ["TF_CPP_MIN_LOG_LEVEL"] = "3"
    import numpy as np
    import tensorflow as tf

    cpu = tf.config.list_physical_devices("CPU")[0]
    tf.config.set_logical_device_configuration(
        cpu, [tf.config.LogicalDeviceConfiguration()] * 2)
    import keras
    sys.path.insert(0, "tests")  # The child runs in the repository root.
    from _distribution_case import build, compile, data, train

    x, y = data()
    keras.utils.set_random_seed(0)
    single = build()
    initial = single.get_weights()
    compile(single)
    single_history = train(single, x, y)
    strategy = tf.distribute.MirroredStrategy(["/cpu:0", "/cpu:1"])
    with strategy.scope():
        mirrored = build()
        mirrored.set_weights(initial)
        compile(mirrored)
    mirrored_history = train(mirrored, x, y)
    print(json.dumps({
        "replicas": strategy.num_replicas_in_sync,
        "weight_diff": max(float(np.max(np.abs(a - b))) for a, b in
                           zip(single.get_weights(), mirrored.get_weights())),
        "single": single_history,
        "mirrored": mirrored_history,
        "iterations": int(mirrored.optimizer.iterations.numpy()),
        "inner_iterations": [int(o.iterations.numpy())
                             for o in mirrored.optimizer.loss_optimizers],
    }))
    """
)


@tensorflow_only
def test_mirrored_strategy_matches_single_device():
    """Two replicas of half the batch each train exactly like one device:
    per-loss updates all-reduce once each, losses (and the weight
    regularizer) are scaled per replica, and the logs show global values."""
    completed = subprocess.run(
        [sys.executable, "-c", SCRIPT],
        cwd=pathlib.Path(__file__).resolve().parents[1],
        capture_output=True,
        text=True,
        timeout=300,
        check=True,
    )
    result = json.loads(completed.stdout.strip().splitlines()[-1])
    assert result["replicas"] == 2
    assert result["weight_diff"] < 1e-6
    assert result["iterations"] == 4
    assert result["inner_iterations"] == [4, 4]
    assert set(result["mirrored"]) == set(result["single"]) == {
        "loss", "aux_loss", "final_loss", "aux_accuracy", "final_accuracy",
        "nu", "gamma_0", "gamma_1",
    }
    for key, values in result["single"].items():
        for single, mirrored in zip(values, result["mirrored"][key]):
            assert abs(single - mirrored) < 1e-5, key
