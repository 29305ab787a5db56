"""Serving exports of an `AnytimeModel`: TF SavedModel and TFLite.

Two variants, both returning `{"logits": (batch, num_classes), "exit_index":
(batch,)}` with the routing of `AnytimeModel`:

- **early exit** (`static=False`, the default): the trunk runs stage by
  stage inside the graph, each stage on the samples still undecided
  (`tf.where` + `tf.gather`), and a `tf.cond` per stage skips the rest of
  the network when no sample is left. At batch 1 an easy input computes
  only the segments up to its exit head. Shapes inside the graph depend on
  the data.
- **static** (`static=True`): every head on every sample, then the routing
  rule by selection (`tf.where` on the heads' logits). No control flow and
  no data-dependent shape: the cost of the full model plus the heads.

Which to pick:

- Early exit for latency-bound serving on CPUs (TF Serving, TFLite's CPU
  kernels), small batches and above all batch 1, and whenever many inputs
  are easy: compute really stops at the exit head.
- Static where the runtime wants fixed shapes and no control flow: XLA /
  TPU compilation, GPU or NPU delegates of TFLite (which fall back to the
  CPU on `If`/`Where`), converters to other formats; and for large batches
  on accelerators, where the whole batch waits for its slowest sample
  anyway and the gathers cost more than they save. The exit index still
  tells how much compute early exit would have saved.
"""

import tempfile

import keras


def serving_function(model, static=False, input_signature=None):
    """A `tf.function` of the routing, for `export_saved_model`.

    Args:
        model: An `AnytimeModel`.
        static: `False` for true early exit (`tf.cond` per stage), `True` to
            compute every exit.
        input_signature: `tf.TensorSpec`s of the inputs; default from the
            wrapped model's inputs, with a free batch dimension.

    Returns:
        A `tf.function` taking the inputs and returning `{"logits": ...,
        "exit_index": ...}`.
    """
    tf = _tensorflow()
    _check_model(model)
    if keras.backend.backend() != "tensorflow":
        raise ValueError(
            "The serving exports trace the model with TensorFlow: use the "
            "TensorFlow backend (KERAS_BACKEND=tensorflow). Received: "
            f"backend {keras.backend.backend()!r}"
        )
    if input_signature is None:
        input_signature = [
            tf.TensorSpec((None,) + tuple(x.shape[1:]), x.dtype or "float32",
                          name=x.name)
            for x in model.base_model.inputs
        ]
    plan = model._plan
    args = (model.thresholds, model.temperature, model.confidence)
    single = len(input_signature) == 1

    @tf.function(input_signature=input_signature)
    def serve(*inputs):
        inputs = inputs[0] if single else list(inputs)
        if static:
            logits, exit_index = plan.run_static(inputs, *args)
        else:
            logits, exit_index = plan.run_routed(inputs, *args, cond=tf.cond)
        return {"logits": logits, "exit_index": exit_index}

    return serve


def export_saved_model(model, path, static=False, input_signature=None,
                       verbose=False):
    """Writes a TF SavedModel of `model` with a `serve` endpoint.

    The SavedModel loads with `tf.saved_model.load(path)` (or TF Serving)
    without keras_mwbp; `loaded.serve(x)` returns `{"logits": ...,
    "exit_index": ...}`.

    Args:
        model: An `AnytimeModel`.
        path: Directory to write.
        static: Early exit (`False`, default) or every exit computed.
        input_signature: As for `serving_function`.
        verbose: Whether Keras prints the endpoint summary.

    Returns:
        `path`.

    Example:

    >>> export_saved_model(fast, "anytime_savedmodel")
    >>> tf.saved_model.load("anytime_savedmodel").serve(x[:1])["exit_index"]
    """
    serve = serving_function(model, static, input_signature)
    archive = keras.export.ExportArchive()
    # The variables of the layers, through a plain functional view of the
    # wrapped model (its optimizer, if compiled, is not part of serving).
    base = model.base_model
    archive.track(keras.Model(base.inputs, base.outputs))
    archive.add_endpoint("serve", serve)
    archive.write_out(path, verbose=verbose)
    return path


def export_tflite(model, path, static=False, input_signature=None):
    """Writes a TFLite flatbuffer of `model`'s routing.

    Builtin ops only. The early-exit variant uses TFLite's `If`, `Where`
    and `Gather`, with data-dependent shapes inside: run it with the
    builtin kernels, `tf.lite.Interpreter(path,
    experimental_op_resolver_type=tf.lite.experimental.OpResolverType.
    BUILTIN_WITHOUT_DEFAULT_DELEGATES)` (the XNNPack delegate cannot
    prepare the `If` branches), and give the batch size with
    `resize_tensor_input` before `allocate_tensors`. The static variant
    runs with the default delegates.

    Args:
        model: An `AnytimeModel`.
        path: File to write (e.g. `"anytime.tflite"`).
        static: Early exit (`False`, default) or every exit computed.
        input_signature: As for `serving_function`.

    Returns:
        `path`.
    """
    tf = _tensorflow()
    # Through a SavedModel: converting the concrete function directly leaves
    # the variables read inside the `tf.cond` branches unfrozen.
    with tempfile.TemporaryDirectory() as directory:
        export_saved_model(model, directory, static, input_signature)
        converter = tf.lite.TFLiteConverter.from_saved_model(directory)
        converter.target_spec.supported_ops = [tf.lite.OpsSet.TFLITE_BUILTINS]
        flatbuffer = converter.convert()
    with open(path, "wb") as file:
        file.write(flatbuffer)
    return path


def _check_model(model):
    if not hasattr(model, "_plan") or not hasattr(model, "thresholds"):
        raise ValueError(
            "`model` must be a keras_mwbp.anytime.AnytimeModel. Received: "
            f"model={model!r}"
        )


def _tensorflow():
    try:
        import tensorflow as tf
    except ImportError as error:  # pragma: no cover - depends on install.
        raise ImportError(
            "The serving exports of an AnytimeModel need TensorFlow: "
            "pip install tensorflow"
        ) from error
    return tf
