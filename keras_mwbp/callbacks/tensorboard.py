"""`TensorBoard`: Keras's TensorBoard callback plus a custom-scalar layout
that puts every head's curves of a `keras_mwbp.MultiWayModel` in one chart."""

import re

import keras

from keras_mwbp import _compat

LAYOUT_TITLE = "multi-way BP"
# Chart titles of the layout, in order.
LOSS_CHART = "loss"
ACCURACY_CHART = "accuracy"
LOSS_WEIGHTS_CHART = "loss weights"


def heads_layout(output_names=None, title=LAYOUT_TITLE):
    """The custom-scalar layout of a multi-head model's epoch curves.

    One category named `title` with three multiline charts, each a regular
    expression over the tags that `keras.callbacks.TensorBoard` writes per
    epoch (`epoch_<log key>`, the same tag in the `train` and `validation`
    runs, so each chart shows both):

    - `"loss"`: every head's unweighted loss, `epoch_<output name>_loss`.
    - `"accuracy"`: every head's accuracy metric,
      `epoch_<output name>_<...>accuracy` (or `acc`), e.g.
      `epoch_final_accuracy`, `epoch_final_sparse_categorical_accuracy`.
    - `"loss weights"`: `epoch_nu` and `epoch_gamma_<i>` (training run only).

    TensorBoard matches a chart's regex at the start of each tag (Python
    `re.match`); the expressions are anchored at both ends.

    Args:
        output_names: The model's output names, to match exactly these heads;
            `None` or empty matches any `epoch_<name>_loss` /
            `epoch_<name>_accuracy` (but not the total `epoch_loss`).
        title: Title of the layout's category.

    Returns:
        A `tensorboard.plugins.custom_scalar.layout_pb2.Layout`.

    Example:

    ```python
    layout = heads_layout(["h0", "h1", "final"])
    [chart.title for chart in layout.category[0].chart]
    # ['loss', 'accuracy', 'loss weights']
    layout.category[0].chart[0].multiline.tag
    # ['^epoch_(h0|h1|final)_loss$']
    ```
    """
    from tensorboard.plugins.custom_scalar import layout_pb2

    names = [str(name) for name in output_names or ()]
    if names:
        heads = "(" + "|".join(re.escape(name) for name in names) + ")"
    else:
        heads = ".+"
    charts = (
        (LOSS_CHART, rf"^epoch_{heads}_loss$"),
        (ACCURACY_CHART, rf"^epoch_{heads}_(\w+_)?acc(uracy)?$"),
        (LOSS_WEIGHTS_CHART, r"^epoch_(nu|gamma_\d+)$"),
    )
    return layout_pb2.Layout(
        category=[
            layout_pb2.Category(
                title=title,
                chart=[
                    layout_pb2.Chart(
                        title=chart_title,
                        multiline=layout_pb2.MultilineChartContent(tag=[regex]),
                    )
                    for chart_title, regex in charts
                ],
            )
        ]
    )


class TensorBoard(keras.callbacks.TensorBoard):
    """Keras's TensorBoard callback, with a custom-scalar layout of the heads.

    Everything `keras.callbacks.TensorBoard` does keeps working (all of its
    arguments are accepted): it writes each epoch-log entry as the scalar
    `epoch_<key>` into the `train` run (`<log_dir>/train`) and, without the
    `val_` prefix, into the `validation` run (`<log_dir>/validation`). For a
    `keras_mwbp.MultiWayModel` that is every head's curves
    (`epoch_<output name>_loss`, `epoch_<output name>_<metric>`), the
    objective `epoch_loss`, and in the train run `epoch_nu` and
    `epoch_gamma_0` .. `epoch_gamma_K`.

    In addition, when training begins, this callback writes into the train
    run a custom-scalar layout (TensorBoard's "Custom Scalars" dashboard)
    with one category and three charts (see `heads_layout`): all heads'
    losses, all heads' accuracies (train and validation runs, each a line),
    and the loss weights nu and gamma_i. The charts match the model's own
    output names. They show epoch curves; batch-level scalars
    (`update_freq="batch"`) are written as usual but not charted.

    Needs the `tensorboard` package.

    Args:
        log_dir: Directory of the event files, as for
            `keras.callbacks.TensorBoard`.
        layout_title: Title of the custom-scalar category.
        **kwargs: Passed to `keras.callbacks.TensorBoard` (`histogram_freq`,
            `write_graph`, `update_freq`, ...).

    Example:

    ```python
    model = keras_mwbp.MultiWayModel(inputs, [aux, final], method="mwbp")
    model.compile(optimizer="sgd", metrics=["accuracy"],
                  loss=keras.losses.SparseCategoricalCrossentropy(
                      from_logits=True))
    model.fit(x, y, epochs=10, validation_data=(x_val, y_val),
              callbacks=[keras_mwbp.callbacks.TensorBoard("logs/run1")])
    # $ tensorboard --logdir logs   (see the "Custom Scalars" tab)
    ```
    """

    def __init__(self, log_dir="logs", layout_title=LAYOUT_TITLE, **kwargs):
        super().__init__(log_dir=log_dir, **kwargs)
        self.layout_title = layout_title

    def layout(self):
        """The custom-scalar layout written for the current model.

        Returns:
            A `tensorboard.plugins.custom_scalar.layout_pb2.Layout`.

        Example:

        ```python
        callback = keras_mwbp.callbacks.TensorBoard("logs")
        callback.set_model(model)
        callback.layout().category[0].chart[2].title  # 'loss weights'
        ```
        """
        names = getattr(self.model, "output_names", None)
        return heads_layout(names, self.layout_title)

    def on_train_begin(self, logs=None):
        super().on_train_begin(logs)
        self._write_layout()

    def _write_layout(self):
        from tensorboard.summary import v1 as summary_v1

        proto = summary_v1.custom_scalar_pb(self.layout())
        with _compat.train_writer(self).as_default():
            self.summary.experimental.write_raw_pb(
                proto.SerializeToString(), step=0
            )
        _compat.train_writer(self).flush()
