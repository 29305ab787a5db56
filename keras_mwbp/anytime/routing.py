"""The routing rule of anytime prediction, and what it costs.

Shared by `calibrate`, `AnytimeModel`, the serving exports and the curve:

- `ExitPlan(model)` splits a multi-head functional model into segments:
  segment `s` is the nodes head `s` needs that no earlier head needs
  (`keras_mwbp.graph.HeadGraph`'s ancestors). `run_routed` runs them one
  after the other, each only on the samples no earlier head has taken.
- `confidence(logits, temperature, kind)` is the score compared with a
  head's threshold, in `keras.ops` (any backend); `route_numpy` applies the
  rule to per-head confidences held in NumPy arrays.
- `ExitPlan.exit_costs` are the multiply-adds of a sample that exits at each
  head, counted as `keras_mwbp.report` counts them (convolutions and dense
  layers): the cost of every segment up to and including the head's own.
"""

import math

import keras
import numpy as np
from keras import ops

from keras_mwbp import _compat
from keras_mwbp.graph import HeadGraph
from keras_mwbp.report import _node_multiply_adds

#: Accepted values of `confidence`.
CONFIDENCES = ("max_prob", "entropy")


# ------------------------------------------------------------ confidence
def confidence(logits, temperature=1.0, kind="max_prob"):
    """Per-sample confidence of one head's logits, in [0, 1].

    - `"max_prob"`: the top softmax probability of `logits / temperature`.
    - `"entropy"`: `1 - H(p) / log(num_classes)`, with `H` the entropy of
      `p = softmax(logits / temperature)`: 1 for a one-hot `p`, 0 for a
      uniform one.

    A sample exits at a head when its confidence is at least the head's
    threshold, for both kinds.

    Args:
        logits: Tensor of shape `(batch, num_classes)`.
        temperature: Positive float dividing the logits.
        kind: One of `CONFIDENCES`.

    Returns:
        A float32 tensor of shape `(batch,)`.
    """
    z = ops.cast(logits, "float32") / float(temperature)
    if kind == "max_prob":
        return ops.max(ops.softmax(z, axis=-1), axis=-1)
    num_classes = int(logits.shape[-1])
    log_p = ops.log_softmax(z, axis=-1)
    entropy = -ops.sum(ops.exp(log_p) * log_p, axis=-1)
    return 1.0 - entropy / math.log(num_classes)


def numpy_confidence(logits, temperature=1.0, kind="max_prob"):
    """`confidence` of a NumPy array, returned as a NumPy float array."""
    return np.asarray(
        ops.convert_to_numpy(
            confidence(ops.convert_to_tensor(logits), temperature, kind)
        )
    )


def route_numpy(confidences, thresholds):
    """The exit head of every sample, from per-head confidences.

    Args:
        confidences: Array `(num_heads, N)`; the final row is not read.
        thresholds: `num_heads` thresholds; the final one is not read.

    Returns:
        Int array `(N,)`: the first head `i` whose confidence reaches
        `thresholds[i]`, or the final head.
    """
    confidences = np.asarray(confidences)
    num_heads = confidences.shape[0]
    t = np.asarray(thresholds[: num_heads - 1], dtype="float64")[:, None]
    exits = confidences[: num_heads - 1] >= t
    exits = np.concatenate([exits, np.ones((1, exits.shape[1]), bool)])
    return np.argmax(exits, axis=0)


# ------------------------------------------------------------ checks
def check_multi_head_model(model, argument="model"):
    """A `ValueError` unless `model` is a functional model of >= 2 heads."""
    outputs = getattr(model, "outputs", None)
    if not isinstance(model, keras.Model) or not hasattr(
        model, "_nodes_by_depth"
    ) or not isinstance(outputs, (list, tuple)):
        raise ValueError(
            f"`{argument}` must be a functional keras.Model (e.g. a "
            "keras_mwbp.MultiWayModel) whose outputs are the heads' logits. "
            f"Received: {argument}={model!r}"
        )
    if len(outputs) < 2:
        raise ValueError(
            f"`{argument}` must have at least two heads (auxiliary heads and "
            f"the final one) to exit early. Received: {argument} "
            f"{model.name!r} with {len(outputs)} head(s)."
        )
    classes = {tuple(out.shape[1:]) for out in outputs}
    if len(classes) != 1 or any(len(c) != 1 or c[0] is None for c in classes):
        raise ValueError(
            f"Every head of `{argument}` must output logits of one shape "
            "`(batch, num_classes)`. Received head output shapes: "
            f"{[tuple(out.shape) for out in outputs]}"
        )


def check_temperature(temperature, argument="temperature"):
    if (
        isinstance(temperature, bool)
        or not isinstance(temperature, (int, float, np.floating, np.integer))
        or not (math.isfinite(temperature) and temperature > 0)
    ):
        raise ValueError(
            f"`{argument}` must be a positive finite number. Received: "
            f"{argument}={temperature!r}"
        )
    return float(temperature)


def check_confidence(kind):
    if kind not in CONFIDENCES:
        raise ValueError(
            f"`confidence` must be one of {CONFIDENCES}. Received: "
            f"confidence={kind!r}"
        )
    return kind


def check_thresholds(thresholds, num_heads):
    """Thresholds as a tuple of floats, or a `ValueError` naming them."""
    if isinstance(thresholds, (str, bytes)) or not hasattr(
        thresholds, "__len__"
    ):
        raise ValueError(
            f"`thresholds` must be a sequence of {num_heads} numbers, one per "
            f"head. Received: thresholds={thresholds!r}"
        )
    values = list(np.asarray(thresholds, dtype=object).reshape(-1)) if (
        isinstance(thresholds, np.ndarray)
    ) else list(thresholds)
    if len(values) != num_heads:
        raise ValueError(
            f"`thresholds` must hold one entry per head ({num_heads} for this "
            f"model; the final head's entry is ignored). Received: "
            f"thresholds={list(thresholds)!r} ({len(values)} entries)"
        )
    checked = []
    for index, value in enumerate(values):
        if isinstance(value, bool) or not isinstance(
            value, (int, float, np.floating, np.integer)
        ) or not 0.0 <= float(value) <= 1.0:
            raise ValueError(
                "`thresholds` must be confidences in [0, 1]. Received: "
                f"thresholds[{index}]={value!r}"
            )
        checked.append(float(value))
    return tuple(checked)


# ------------------------------------------------------------ the plan
class ExitPlan:
    """The segments of a multi-head functional model, in run order.

    Args:
        model: A functional model whose outputs are the heads' logits,
            shallowest first.

    Attributes:
        segments: For each head, the indices (into `graph.nodes`, in run
            order) of the nodes it needs and no earlier head needs.
        live_after: For each head `s`, the `id()`s of the tensors computed
            up to segment `s` (or model inputs) that a later segment or a
            later head's output reads: what is gathered for the samples
            that go on.
        exit_costs: Multiply-adds of a sample exiting at each head (every
            segment up to its own, earlier heads included), an int per head.
        head_costs: Multiply-adds of each head's intermediate model alone
            (`count_multiply_adds(model.exit_model(i))`).
    """

    def __init__(self, model):
        self.model = model
        self.graph = HeadGraph(model)
        seen = set()
        self.segments = []
        for ancestors in self.graph.ancestors:
            self.segments.append(sorted(ancestors - seen))
            seen |= ancestors
        self.output_ids = [id(out) for out in model.outputs]
        num_heads = len(model.outputs)
        self.live_after = []
        for s in range(num_heads - 1):
            later = {n for seg in self.segments[s + 1:] for n in seg}
            needed = set(self.output_ids[s + 1:])
            for n in later:
                needed |= {id(x) for x in self.graph.nodes[n].input_tensors}
            produced_later = {
                id(x) for n in later for x in self.graph.nodes[n].outputs
            }
            self.live_after.append(needed - produced_later)
        costs, total = [], 0
        for seg in self.segments:
            total += sum(
                int(_node_multiply_adds(self.graph.nodes[n])) for n in seg
            )
            costs.append(total)
        self.exit_costs = tuple(costs)
        self.head_costs = tuple(
            sum(int(_node_multiply_adds(self.graph.nodes[n])) for n in nodes)
            for nodes in self.graph.ancestors
        )
        self.num_classes = int(model.outputs[0].shape[-1])
        self.logits_dtype = model.outputs[0].dtype or "float32"

    @property
    def num_heads(self):
        return len(self.segments)

    def run_segment(self, s, values):
        """Runs segment `s` in inference mode; adds its tensors to `values`."""
        for n in self.segments[s]:
            node = self.graph.nodes[n]
            args, kwargs = node.arguments.fill_in(values)
            operation = node.operation
            if "training" in _compat.call_context_args(operation):
                kwargs["training"] = False
            outputs = operation(*args, **kwargs)
            for x, y in zip(node.outputs, keras.tree.flatten(outputs)):
                values[id(x)] = y
        return values[self.output_ids[s]]

    def run_routed(self, inputs, thresholds, temperature, kind, cond=None):
        """Anytime inference on a batch: gather, run, scatter back.

        Segment `s + 1` runs only on the samples whose confidence at heads
        `0 .. s` stayed below the thresholds: the tensors it needs are
        gathered for those samples. When no sample is left the remaining
        segments are skipped: by a Python `if` when the count is known
        (eager execution), else by `cond` (default `keras.ops.cond`, i.e.
        `tf.cond` in a TensorFlow graph).

        Args:
            inputs: The model's inputs (a tensor or a list), batch first.
            thresholds: One float per head (the final one is ignored).
            temperature: Positive float.
            kind: One of `CONFIDENCES`.
            cond: `cond(pred, true_fn, false_fn)`; default `keras.ops.cond`.

        Returns:
            `(logits, exit_index)`: the exit head's logits `(batch,
            num_classes)` and its index `(batch,)`, int32, in input order.
        """
        cond = cond or ops.cond
        flat = keras.tree.flatten(inputs)
        values = {
            id(x): ops.convert_to_tensor(y)
            for x, y in zip(self.model.inputs, flat)
        }
        batch = ops.shape(flat[0])[0]
        index = ops.arange(batch, dtype="int32")
        logits, order, heads = self._stage(
            0, values, index, thresholds, temperature, kind, cond
        )
        back = ops.argsort(order)  # Scatter back: invert the permutation.
        return ops.take(logits, back, axis=0), ops.take(heads, back, axis=0)

    def _stage(self, s, values, index, thresholds, temperature, kind, cond):
        """`(logits, sample index, exit head)` of the samples entering `s`."""
        logits = self.run_segment(s, values)
        if s == self.num_heads - 1:
            return logits, index, ops.full(ops.shape(index), s, "int32")
        score = confidence(logits, temperature, kind)
        decided = ops.greater_equal(score, thresholds[s])
        taken = _where(decided)
        left = _where(ops.logical_not(decided))
        out = (
            ops.take(logits, taken, axis=0),
            ops.take(index, taken, axis=0),
            ops.full(ops.shape(taken), s, "int32"),
        )

        def go_on():
            kept = {
                key: ops.take(values[key], left, axis=0)
                for key in self.live_after[s]
            }
            return self._stage(
                s + 1, kept, ops.take(index, left, axis=0),
                thresholds, temperature, kind, cond,
            )

        def nothing_left():
            return (
                ops.zeros((0, self.num_classes), logits.dtype),
                ops.zeros((0,), "int32"),
                ops.zeros((0,), "int32"),
            )

        count = ops.shape(left)[0]
        if isinstance(count, int):
            rest = go_on() if count > 0 else nothing_left()
        else:
            rest = cond(ops.greater(count, 0), go_on, nothing_left)
        return tuple(
            ops.concatenate(
                [a, ops.cast(b, keras.backend.standardize_dtype(a.dtype))],
                axis=0,
            )
            for a, b in zip(out, rest)
        )

    def run_routed_jax(self, inputs, thresholds, temperature, kind):
        """`run_routed` for the JAX backend, each segment compiled.

        JAX compiles for static shapes, so each segment is a `jax.jit`
        function (the model's variables passed in, through a
        `keras.StatelessScope`) that also returns which samples exit; the
        gathers happen between segments, and each gathered batch is padded
        to the next power of two so that few shapes are compiled.

        Returns:
            `(logits, exit_index)` as NumPy arrays, in input order.
        """
        import jax.numpy as jnp

        flat = keras.tree.flatten(inputs)
        n = int(flat[0].shape[0])
        variables = list(self.model.variables)
        state = [v.value for v in variables]
        positions = np.arange(n)
        pad = _padded(positions, n)
        live = {
            id(x): jnp.take(jnp.asarray(y), pad, axis=0)
            for x, y in zip(self.model.inputs, flat)
        }
        out_logits = np.zeros((n, self.num_classes), "float32")
        out_exit = np.zeros((n,), "int32")
        for s in range(self.num_heads):
            step = self._jax_segment(s, variables, tuple(thresholds),
                                     float(temperature), kind)
            logits, decided, live = step(state, live)
            count = len(positions)
            logits = np.asarray(logits)[:count]
            decided = np.asarray(decided)[:count]
            taken = np.flatnonzero(decided)
            out_logits[positions[taken]] = logits[taken]
            out_exit[positions[taken]] = s
            left = np.flatnonzero(~decided)
            if not len(left):
                break
            positions = positions[left]
            pad = _padded(left, len(left))
            live = {k: jnp.take(v, pad, axis=0) for k, v in live.items()}
        return out_logits, out_exit

    def _jax_segment(self, s, variables, thresholds, temperature, kind):
        import jax

        key = (s, thresholds, temperature, kind,
               tuple(id(v) for v in variables))
        cache = self.__dict__.setdefault("_jax_cache", {})
        if key in cache:
            return cache[key]
        last = s == self.num_heads - 1
        keep = () if last else tuple(sorted(self.live_after[s]))

        def step(state, live):
            with keras.StatelessScope(
                state_mapping=list(zip(variables, state))
            ):
                values = dict(live)
                logits = self.run_segment(s, values)
                if last:
                    decided = ops.ones(ops.shape(logits)[:1], "bool")
                else:
                    decided = ops.greater_equal(
                        confidence(logits, temperature, kind), thresholds[s]
                    )
                return logits, decided, {k: values[k] for k in keep}

        cache[key] = jax.jit(step)
        return cache[key]

    def run_static(self, inputs, thresholds, temperature, kind):
        """Every head on every sample, then the routing rule by selection.

        Returns the same `(logits, exit_index)` as `run_routed`, with no
        data-dependent shape or control flow.
        """
        heads = keras.tree.flatten(self.model(inputs, training=False))
        num_heads = len(heads)
        logits = heads[-1]
        exit_index = ops.full(ops.shape(heads[-1])[:1], num_heads - 1,
                              "int32")
        for s in range(num_heads - 2, -1, -1):
            decided = ops.greater_equal(
                confidence(heads[s], temperature, kind), thresholds[s]
            )
            logits = ops.where(decided[:, None], heads[s], logits)
            exit_index = ops.where(decided, s, exit_index)
        return logits, ops.cast(exit_index, "int32")


def _padded(indices, count):
    """`indices` padded with 0s to the next power of two >= `count`."""
    size = 1 << max(int(count) - 1, 0).bit_length()
    return np.concatenate(
        [indices, np.zeros(size - len(indices), dtype=indices.dtype)]
    ).astype("int32")


def _where(mask):
    """int32 indices of the true entries of a 1-D boolean tensor."""
    if keras.backend.backend() == "tensorflow":
        # `keras.ops.nonzero` unstacks tf.where's int64 result, which TFLite
        # has no builtin for; a reshape converts.
        import tensorflow as tf

        return tf.cast(tf.reshape(tf.where(mask), [-1]), "int32")
    return ops.cast(ops.nonzero(mask)[0], "int32")


# ------------------------------------------------------------ data
def collect_logits(model, data, batch_size=256, argument="data"):
    """Per-head logits and labels of `data`.

    Args:
        model: A multi-head functional model.
        data: `(x, y)` arrays, or a `tf.data.Dataset` of `(x, y)` batches.
        batch_size: Batch size of `model.predict` on arrays.
        argument: Name of the argument in error messages.

    Returns:
        `(logits, labels)`: a list of NumPy arrays `(N, num_classes)`, one
        per head, and int labels `(N,)`.

    Raises:
        ValueError: If `data` is not as above, is empty, or its labels hold
            a single class.
    """
    outputs, labels = [], []
    if isinstance(data, (tuple, list)) and len(data) == 2:
        x, y = data
        size = len(keras.tree.flatten(x)[0])
        if len(y) != size:
            raise ValueError(
                f"`{argument}` must hold one label per input. Received "
                f"{len(y)} labels for {size} inputs."
            )
        if size:
            outputs.append(model.predict(x, batch_size=batch_size, verbose=0))
            labels.append(np.asarray(y))
    elif _is_dataset(data):
        for element in data:
            if not isinstance(element, (tuple, list)) or len(element) < 2:
                raise ValueError(
                    f"`{argument}` must be a dataset of `(x, y)` batches. "
                    f"Received an element of type {type(element).__name__}."
                )
            outputs.append(model.predict_on_batch(element[0]))
            labels.append(np.asarray(ops.convert_to_numpy(element[1])))
    else:
        raise ValueError(
            f"`{argument}` must be an `(x, y)` tuple of arrays or a "
            f"tf.data.Dataset of `(x, y)` batches. Received: {argument} of "
            f"type {type(data).__name__}"
        )
    if not outputs:
        raise ValueError(
            f"`{argument}` must hold at least one sample. Received: an empty "
            f"{argument}."
        )
    heads = [
        np.concatenate([np.asarray(keras.tree.flatten(o)[i]) for o in outputs])
        for i in range(len(model.outputs))
    ]
    num_classes = heads[0].shape[-1]
    y = np.concatenate(labels)
    if y.ndim == 2 and y.shape[1] == num_classes and num_classes > 1:
        y = np.argmax(y, axis=-1)
    y = np.reshape(y, (-1,)).astype("int64")
    if len(y) != len(heads[0]):
        raise ValueError(
            f"`{argument}` must hold one label per sample. Received "
            f"{len(y)} labels for {len(heads[0])} samples."
        )
    classes = np.unique(y)
    if len(classes) < 2:
        raise ValueError(
            f"`{argument}` must hold samples of at least two classes to "
            f"calibrate on. Received: {len(y)} samples, all of class "
            f"{int(classes[0])}."
        )
    return heads, y


def _is_dataset(data):
    try:
        import tensorflow as tf
    except ImportError:  # pragma: no cover - depends on the install.
        return False
    return isinstance(data, tf.data.Dataset)


def evaluate_routing(confidences, correct, costs, thresholds):
    """`(accuracy, average multiply-adds, exit fractions)` of thresholds."""
    exits = route_numpy(confidences, thresholds)
    n = exits.shape[0]
    accuracy = float(np.mean(correct[exits, np.arange(n)]))
    madds = float(np.mean(np.asarray(costs, dtype="float64")[exits]))
    fractions = np.bincount(exits, minlength=len(costs)) / n
    return accuracy, madds, tuple(float(f) for f in fractions)
