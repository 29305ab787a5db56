"""Resuming inside an epoch, for `keras_mwbp.callbacks.BackupAndRestore`.

`BackupAndRestore` calls `resume_in_epoch` when it restores a backup made in
the middle of an epoch; each backend's train function (see
`keras_mwbp.train_function`) then calls
`skip_batches` instead of training while `model._batches_to_skip` is
positive: the batch is drawn from the data (so the data order goes on as in
the uninterrupted run) and not trained on.
"""

from keras_mwbp import _compat


def resume_in_epoch(model, batches, logs, metric_values):
    """Resumes an epoch after its first `batches` batches (see
    `keras_mwbp.callbacks.BackupAndRestore`): the train function draws
    those batches from the data without training on them, returning
    `logs`, then sets the metrics' running totals to `metric_values`."""
    model._batches_to_skip = int(batches)
    model._skipped_logs = dict(logs)
    model._resume_metric_values = list(metric_values)


def skip_batches(model, iterator):
    """Draws one execution's batches from `iterator` without training and
    returns the backup's logs; after the last skipped batch, puts the
    metrics' running totals back (building the metrics first if needed)."""
    for _ in range(model.steps_per_execution):
        batch = next(iterator)
    model._batches_to_skip -= model.steps_per_execution
    values = model._resume_metric_values
    if model._batches_to_skip <= 0 and values is not None:
        model._resume_metric_values = None
        if len(model.metrics_variables) != len(values):
            # Compiled metrics are built with the first step; build them
            # now from the batch's shapes.
            _compat.symbolic_build(model, batch)
        variables = model.metrics_variables
        shapes = [tuple(v.shape) for v in variables]
        if shapes != [tuple(numpy_value.shape) for numpy_value in values]:
            raise ValueError(
                "The backup's metric state does not match the compiled "
                f"metrics: {len(values)} saved variables, {len(shapes)} "
                "in this model. Compile with the metrics of the run that "
                "made the backup."
            )
        for variable, value in zip(variables, values):
            variable.assign(value)
    return dict(model._skipped_logs)
