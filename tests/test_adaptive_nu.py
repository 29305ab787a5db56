"""`keras_mwbp.callbacks.AdaptiveNu`: the paper's Adaptive-I/II schedules of
nu (Sec. 6.2), driven by the optimizer's learning rate or by epochs."""

import keras
import numpy as np
import pytest

import keras_mwbp
from conftest import mlp_data
from conftest import mlp_model
from conftest import sparse_ce
from keras_mwbp.callbacks import AdaptiveNu

L = keras.layers

# The model below has tap depths 1, 2, 3 and the final depth 5, so Eq. 5
# gives gamma = ((1/3)**nu, (2/3)**nu, 1, 1) (no floor reached). By hand:
EXPECTED_GAMMAS = {
    0.5: (0.5773502692, 0.8164965809, 1.0, 1.0),
    1.0: (0.3333333333, 0.6666666667, 1.0, 1.0),
    2.0: (0.1111111111, 0.4444444444, 1.0, 1.0),
}
# Learning rate per epoch with two drops, and the nu each mode gives.
RATES = (0.1, 0.1, 0.01, 0.01, 0.001)
NU = {"I": (0.5, 0.5, 1.0, 1.0, 2.0), "II": (2.0, 2.0, 1.0, 1.0, 0.5)}
N, BATCH = 16, 8  # Two steps per epoch.


class TraceCounter(L.Layer):
    """Identity; counts its calls while a `tf.function` is being traced."""

    def __init__(self, **kwargs):
        super().__init__(**kwargs)
        self.traces = 0

    def call(self, x):
        import tensorflow as tf

        if not tf.executing_eagerly():
            self.traces += 1
        return x


def counted_model(method="mwbp", **kwargs):
    """x -> counter -> d1 [h0] -> d2 [h1] -> d3 [h2] -> d4 -> final."""
    keras.utils.set_random_seed(0)
    inputs = keras.Input((6,), name="x")
    x = TraceCounter(name="counter")(inputs)
    heads = []
    for i in range(3):
        x = L.Dense(4, activation="relu", name=f"d{i + 1}")(x)
        heads.append(L.Dense(3, name=f"h{i}")(x))
    x = L.Dense(4, activation="relu", name="d4")(x)
    heads.append(L.Dense(3, name="final")(x))
    model = keras_mwbp.MultiWayModel(inputs, heads, method=method, **kwargs)
    assert model.head_depths == (1, 2, 3, 5)
    return model


def compiled(optimizer=None, **kwargs):
    model = counted_model(**kwargs)
    model.compile(optimizer=optimizer or keras.optimizers.SGD(0.1),
                  loss=sparse_ce())
    return model


def rate_by_epoch(rates):
    return keras.callbacks.LearningRateScheduler(
        lambda epoch, lr: rates[epoch]
    )


class Recorder(keras.callbacks.Callback):
    """Per epoch: nu, head_weights, logs, train_function and trace count."""

    def __init__(self):
        super().__init__()
        self.epochs = []

    def on_epoch_end(self, epoch, logs=None):
        self.epochs.append(dict(
            epoch=epoch,
            nu=self.model.nu,
            gammas=self.model.head_weights,
            logs=dict(logs),
            train_function=self.model.train_function,
            traces=self.model.get_layer("counter").traces,
        ))


def fit(model, callbacks, epochs=len(RATES), initial_epoch=0, batch_size=BATCH):
    x, y = mlp_data(N)
    recorder = Recorder()
    model.fit(x, y, batch_size=batch_size, epochs=epochs,
              initial_epoch=initial_epoch, shuffle=False, verbose=0,
              callbacks=list(callbacks) + [recorder])
    return recorder.epochs


def assert_follows(model, epochs, expected_nu):
    """nu, the gammas (model and logs) and the logged objective follow the
    schedule, and the train step is traced only once."""
    assert [e["nu"] for e in epochs] == pytest.approx(expected_nu)
    for record, nu in zip(epochs, expected_nu):
        gammas = EXPECTED_GAMMAS[nu]
        logs = record["logs"]
        np.testing.assert_allclose(record["gammas"], gammas, rtol=1e-6)
        assert logs["nu"] == pytest.approx(nu)
        logged = [logs[f"gamma_{i}"] for i in range(4)]
        np.testing.assert_allclose(logged, gammas, rtol=1e-6)
        # The logged objective sum_i gamma_i * loss_i used these gammas.
        head_losses = [logs[f"{name}_loss"] for name in model.output_names]
        objective = (head_losses[-1] if model.method == "standard"
                     else float(np.dot(gammas, head_losses)))
        assert logs["loss"] == pytest.approx(objective, rel=1e-5)
    assert len({id(e["train_function"]) for e in epochs}) == 1
    assert epochs[0]["traces"] > 0
    assert {e["traces"] for e in epochs} == {epochs[0]["traces"]}


def piecewise_rates():
    # PiecewiseConstantDecay keeps values[i] while step <= boundaries[i]:
    # with 2 steps per epoch, steps 0-3 (epochs 0-1) run at 0.1, steps 4-7
    # (epochs 2-3) at 0.01 and steps 8-9 (epoch 4) at 0.001, as in RATES.
    return keras.optimizers.schedules.PiecewiseConstantDecay(
        [3, 7], [0.1, 0.01, 0.001]
    )


@pytest.mark.parametrize("mode", ["I", "II"])
def test_nu_follows_a_learning_rate_schedule(mode):
    model = compiled(keras.optimizers.SGD(piecewise_rates()))
    epochs = fit(model, [AdaptiveNu(mode)])
    assert_follows(model, epochs, NU[mode])


@pytest.mark.parametrize(
    "mode, adaptive_first", [("I", True), ("II", False)]
)
def test_nu_follows_a_learning_rate_scheduler_in_either_order(
    mode, adaptive_first
):
    model = compiled()
    callbacks = [rate_by_epoch(RATES), AdaptiveNu(mode)]
    if adaptive_first:
        callbacks.reverse()
    epochs = fit(model, callbacks)
    assert_follows(model, epochs, NU[mode])


@pytest.mark.parametrize("method", keras_mwbp.METHODS)
def test_every_method_takes_the_new_loss_weights(method):
    model = compiled(method=method)
    epochs = fit(model, [rate_by_epoch((0.1, 0.01, 0.001)), AdaptiveNu("II")],
                 epochs=3)
    assert_follows(model, epochs, (2.0, 1.0, 0.5))


def test_nu_follows_reduce_lr_on_plateau():
    class Plateau(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            logs["plateau"] = float(epoch)  # Never improves after epoch 0.

    reduce = keras.callbacks.ReduceLROnPlateau(
        monitor="plateau", mode="min", factor=0.5, patience=1
    )
    model = compiled()
    # Rates 0.1, 0.1, 0.05: reduced at the end of epoch 1.
    epochs = fit(model, [AdaptiveNu("II"), Plateau(), reduce], epochs=3)
    assert_follows(model, epochs, (2.0, 2.0, 1.0))


def test_the_compiled_step_applies_the_new_loss_weights():
    """Each head's own output kernel moves by -lr * gamma_i * grad_i."""
    import tensorflow as tf

    x, y = mlp_data(N)
    model = compiled(keras.optimizers.SGD(0.1, momentum=0.0))
    kernels = [model.get_layer(name).kernel for name in model.output_names]
    checked = []

    class CheckUpdate(keras.callbacks.Callback):
        def on_train_batch_begin(self, batch, logs=None):
            with tf.GradientTape(persistent=True) as tape:
                outputs = model(x, training=True)
                losses = [sparse_ce()(y, out) for out in outputs]
            self.expected = [
                k.numpy() - float(model.optimizer.learning_rate) * gamma
                * tape.gradient(loss, k).numpy()
                for k, loss, gamma in zip(kernels, losses, model.head_weights)
            ]

        def on_train_batch_end(self, batch, logs=None):
            for kernel, expected in zip(kernels, self.expected):
                np.testing.assert_allclose(kernel.numpy(), expected,
                                           rtol=1e-5, atol=1e-7)
            checked.append(model.nu)

    rates = (0.1, 0.05, 0.02)
    epochs = fit(
        model,
        [rate_by_epoch(rates), AdaptiveNu("I"), CheckUpdate()],
        epochs=3,
        batch_size=N,  # One full-batch step per epoch.
    )
    assert checked == [0.5, 1.0, 2.0]
    assert_follows(model, epochs, (0.5, 1.0, 2.0))


def test_explicit_boundaries_ignore_the_learning_rate():
    model = compiled()
    epochs = fit(model, [rate_by_epoch(RATES),
                         AdaptiveNu("I", boundaries=[1, 4])])
    assert_follows(model, epochs, (0.5, 1.0, 1.0, 1.0, 2.0))


def test_resumed_training_goes_on_from_the_models_nu():
    model = compiled()
    scheduler = rate_by_epoch(RATES)
    adaptive = AdaptiveNu("I")
    first = fit(model, [scheduler, adaptive], epochs=3)
    assert [e["nu"] for e in first] == [0.5, 0.5, 1.0]
    # The same callback goes on where it stopped.
    same = fit(model, [scheduler, adaptive], initial_epoch=3)
    assert_follows(model, same, (1.0, 2.0))
    # A new callback keeps the model's nu and counts changes from epoch 3.
    model.set_nu(1.0)
    fresh = fit(model, [scheduler, AdaptiveNu("I")], initial_epoch=3)
    assert_follows(model, fresh, (1.0, 2.0))
    # A new run from epoch 0 starts over.
    again = fit(model, [scheduler, AdaptiveNu("I")], epochs=2)
    assert [e["nu"] for e in again] == [0.5, 0.5]


def test_backup_and_restore_resumes_with_the_saved_nu(tmp_path):
    class Interrupt(keras.callbacks.Callback):
        def on_epoch_end(self, epoch, logs=None):
            if epoch == 2:
                raise RuntimeError("interrupted")

    def callbacks():
        return [rate_by_epoch(RATES), AdaptiveNu("I"),
                keras.callbacks.BackupAndRestore(str(tmp_path))]

    with pytest.raises(RuntimeError, match="interrupted"):
        fit(compiled(), callbacks() + [Interrupt()])  # nu 0.5, 0.5, 1
    model = compiled()  # A new model, with nu=2 from its constructor.
    epochs = fit(model, callbacks())
    assert [e["epoch"] for e in epochs] == [3, 4]
    assert_follows(model, epochs, (1.0, 2.0))


def test_resumed_training_with_boundaries_sets_nu_from_the_epoch():
    model = compiled()
    model.set_nu(0.25)
    epochs = fit(model, [AdaptiveNu("II", boundaries=[1, 3])],
                 initial_epoch=2, epochs=4)
    assert_follows(model, epochs, (1.0, 0.5))


@pytest.mark.parametrize(
    "kwargs, message",
    [
        (dict(mode="III"), "`mode` must be 'I' or 'II'. Received: mode='III'"),
        (dict(mode=1), "`mode` must be 'I' or 'II'. Received: mode=1"),
        (dict(mode=["I"]), r"Received: mode=\[.I.\]"),
        (dict(mode="I", boundaries=[3, 1]), "strictly increasing"),
        (dict(mode="I", boundaries=[2, 2]), "strictly increasing"),
        (dict(mode="I", boundaries=[-1, 2]), "non-negative"),
        (dict(mode="I", boundaries=[1.5]), "integers"),
        (dict(mode="I", boundaries=[True]), "integers"),
        (dict(mode="I", boundaries=3), "Received: boundaries=3"),
    ],
)
def test_bad_arguments_raise(kwargs, message):
    with pytest.raises(ValueError, match=message.replace("(", r"\(")):
        AdaptiveNu(**kwargs)


def test_numpy_integer_boundaries_are_accepted():
    assert AdaptiveNu("II", boundaries=np.array([2, 5])).boundaries == (2, 5)


def test_a_model_with_explicit_head_weights_is_refused():
    model = mlp_model(head_weights=[0.5, 0.5, 1.0])
    model.compile(optimizer="sgd", loss=sparse_ce())
    x, y = mlp_data(N)
    with pytest.raises(ValueError, match="AdaptiveNu.*head_weights"):
        model.fit(x, y, epochs=1, verbose=0, callbacks=[AdaptiveNu("I")])


def test_a_model_that_is_not_a_multi_way_model_is_refused():
    inputs = keras.Input((6,))
    model = keras.Model(inputs, L.Dense(3)(inputs))
    model.compile(optimizer="sgd", loss=sparse_ce())
    x, y = mlp_data(N)
    with pytest.raises(ValueError, match="MultiWayModel"):
        model.fit(x, y, epochs=1, verbose=0, callbacks=[AdaptiveNu("I")])
