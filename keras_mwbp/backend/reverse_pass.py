"""The training step shared by the JAX and torch backends: the forward pass
recorded node by node, and gradients by a reverse pass of per-node VJPs.

`ReversePassStep` records each node's inputs (the features of the forward
pass), its non-trainable state before the call (BatchNorm statistics,
dropout seeds) and its outputs, and each head's loss function. There is no
tape: the gradient of a linear combination of the head losses is a reverse
pass over the recorded nodes, each node's vector-Jacobian product taken at
its stored inputs and at its parameters' *current* values, i.e. after the
updates of the earlier losses of the step (paper Eq. 10). A backend's
subclass supplies the primitives: how a node is called and differentiated,
how values are kept, zeros, and which values take a cotangent.

A layer with a fused activation (`fused_activation`) is run in two parts:
the record keeps its pre-activation, and its VJP takes the activation's
derivative there (a feature of the shared forward pass, spec Eq. 4), then
the linear layer's VJP at the current parameters.
"""

import contextlib

import keras

from keras_mwbp._compat import operation_fn
from keras_mwbp._compat import standardize_inputs
from keras_mwbp.backend.fused_activation import fused_activation
from keras_mwbp.backend.fused_activation import pre_activation_calls


class ReversePassStep:
    """One training step's forward record and vector-Jacobian products.

    Args:
        graph: The model's `HeadGraph`.
        initial_state: Optional state before the step, `{id(variable):
            (variable, value)}` (a new forward pass of the same step).
    """

    def __init__(self, graph, initial_state=None):
        self.graph = graph
        self.edges = {}
        self.states = {}
        # The pre-activation of each node with a fused activation.
        self.pre_activations = {}
        self.initial_state = dict(initial_state or {})
        self.new_state = dict(self.initial_state)
        self.loss_inputs = []
        self.loss_fns = {}

    def fresh(self):
        """A new step for another forward pass from this step's initial
        state (same dropout masks), for naive MW-BP; its state is not
        committed."""
        return type(self)(self.graph, self.initial_state)

    def recording(self, persistent):
        """Nothing to record on: gradients are per-node VJPs."""
        del persistent
        return contextlib.nullcontext()

    # -------------------------------------------------------------- forward
    def forward(self, model, x, training=True, nodes=None):
        """Runs the nodes (all, or the indices in `nodes`) and records each
        one's inputs and state; returns the model outputs (None where not
        computed)."""
        self.loss_inputs = self._forward(model, x, training, nodes)
        return self.loss_inputs

    def _forward(self, model, x, training, nodes):
        """The forward pass of `forward`; returns the model outputs as the
        nodes made them."""
        tensors = {
            id(ref): value
            for ref, value in zip(model.inputs, standardize_inputs(model, x))
        }
        for index, node in enumerate(self.graph.nodes):
            if nodes is not None and index not in nodes:
                continue
            edges = {id(t): tensors[id(t)] for t in node.input_tensors}
            self.edges[index] = self._kept_inputs(edges)
            self.states[index] = [
                (v, self._state_value(v))
                for v in getattr(node.operation, "non_trainable_variables", [])
            ]
            outputs, scope = self._forward_node(index, edges, training)
            activation = fused_activation(node.operation)
            if activation is not None:
                self.pre_activations[index] = self._kept(outputs[0])
                outputs = [activation(outputs[0])]
            for variable, _ in self.states[index]:
                new_value = scope.get_current_value(variable)
                if new_value is not None:
                    self.new_state[id(variable)] = (variable, new_value)
            for ref, value in zip(node.outputs, outputs):
                tensors[id(ref)] = value
        return [tensors.get(id(o)) for o in model.outputs]

    def _state_value(self, variable):
        if id(variable) not in self.new_state:
            value = (variable, self._kept_state(variable.value))
            self.initial_state[id(variable)] = value
            self.new_state[id(variable)] = value
        return self.new_state[id(variable)][1]

    def _kept_inputs(self, edges):
        """The inputs of a node (by tensor id) as the record keeps them."""
        return {ref_id: self._kept(value) for ref_id, value in edges.items()}

    def _kept(self, value):
        """A feature of the forward pass as the record keeps it."""
        return value

    def _kept_state(self, value):
        """A variable's value as the record keeps it."""
        return value

    def _forward_node(self, index, edges, training):
        """Node `index` on its inputs `edges` (by tensor id) in the forward
        pass; returns the flat outputs and the `keras.StatelessScope`."""
        raise NotImplementedError

    def _call_node(self, index, values, mapping, training):
        """Node `index` on input `values` (by tensor id) in a
        `keras.StatelessScope` of `mapping`; returns the flat outputs (a
        layer's pre-activation where it has a fused activation) and the
        scope holding the state it wrote."""
        node = self.graph.nodes[index]
        args, kwargs = node.arguments.fill_in(values)
        with keras.StatelessScope(state_mapping=mapping) as scope, \
                pre_activation_calls(node.operation):
            outputs = operation_fn(node.operation, training=training)(
                *args, **kwargs
            )
        return keras.tree.flatten(outputs), scope

    def commit_state(self, after=()):
        """Writes the forward pass's new non-trainable state, once."""
        del after
        for variable, value in self.new_state.values():
            variable.assign(value)

    # --------------------------------------------------------------- losses
    def losses(self, loss_fns, y, y_pred, sample_weight):
        """Each head's loss; records the functions for their VJPs."""
        return [
            self.loss(i, loss_fn, y, out, sample_weight)
            for i, (loss_fn, out) in enumerate(zip(loss_fns, y_pred))
        ]

    def loss(self, index, loss_fn, y, output, sample_weight):
        """Head `index`'s loss of `output`; records it for its VJP."""

        def head_loss(logits):
            return loss_fn(y, logits, sample_weight=sample_weight)

        self.loss_fns[index] = head_loss
        return head_loss(output)

    # ------------------------------------------------------------ gradients
    def gradients(self, objective, variables):
        """Gradients of an `algorithm.Objective` for `variables`, by VJPs of
        every node at its stored inputs and current parameters."""
        return self._backward(objective.coefficients, variables)

    def multiway_gradients(self, index, objective, updated_ids):
        """Gradients of loss `index`'s objective at the current parameters
        (those updated by earlier losses of the step included), for
        `graph.loss_variables[index]`."""
        del updated_ids  # Every node is linearized at its current values.
        return self._backward(
            objective.coefficients, self.graph.loss_variables[index]
        )

    def _backward(self, coefficients, variables):
        """The reverse pass: the gradients of the sum of `coefficient *
        loss[head]` over `coefficients` for `variables` (zeros where a
        variable gets none)."""
        graph = self.graph
        cotangents, var_grads, nodes = {}, {}, set()
        for head, coefficient in coefficients:
            grad = self._loss_vjp(head, coefficient)
            accumulate(cotangents, graph.output_ids[head], grad)
            nodes |= graph.ancestors[head]
        for index in sorted(nodes, reverse=True):
            self._node_vjp(index, cotangents, var_grads)
        return [
            var_grads[id(v)] if id(v) in var_grads else self._zeros_like_variable(v)
            for v in variables
        ]

    def _node_vjp(self, index, cotangents, var_grads):
        """Node `index`'s VJP at its stored inputs and the current values of
        its parameters; adds to `cotangents` (by input tensor) and
        `var_grads` (by variable)."""
        node = self.graph.nodes[index]
        # Each output's cotangent is complete (its consumers come later in
        # run order) and needed no more: dropped, as autograd frees a
        # gradient once used, so a step holds one layer's, not every one's.
        output_cts = [cotangents.pop(id(o), None) for o in node.outputs]
        if all(ct is None for ct in output_cts):
            return
        activation = fused_activation(node.operation)
        if activation is not None:
            output_cts = [self._activation_vjp(
                activation, self.pre_activations[index], output_cts[0]
            )]
        if self._rule_vjp(index, output_cts, cotangents, var_grads):
            return
        # Inputs made by another node, of a float dtype (the model's inputs
        # and integer tensors need no cotangent).
        input_ids = [
            ref_id for ref_id, value in self.edges[index].items()
            if ref_id in self.graph.producer and self._is_float(value)
        ]
        variables = self.graph.node_variables(index)
        grads = self._recall_vjp(index, input_ids, variables, output_cts)
        if grads is None:
            return
        input_grads, param_grads = grads
        for ref_id, grad in zip(input_ids, input_grads):
            accumulate(cotangents, ref_id, grad)
        for variable, grad in zip(variables, param_grads):
            accumulate(var_grads, id(variable), grad)

    def _loss_vjp(self, head, coefficient):
        """The cotangent of head `head`'s output from `coefficient * loss`."""
        raise NotImplementedError

    def _activation_vjp(self, activation, pre_activation, cotangent):
        """The cotangent of a fused activation's input `pre_activation`
        (stored) from its output's `cotangent`."""
        raise NotImplementedError

    def _rule_vjp(self, index, output_cts, cotangents, var_grads):
        """Node `index`'s VJP without a re-call, added to `cotangents` and
        `var_grads`; False where there is none (here: never one)."""
        del index, output_cts, cotangents, var_grads
        return False

    def _recall_vjp(self, index, input_ids, variables, output_cts):
        """Node `index`'s VJP by calling it again at its stored inputs and
        its `variables`' current values: `(input_grads, param_grads)` for
        `input_ids` and `variables` (None entries add nothing), or None
        where nothing flows back."""
        raise NotImplementedError

    def _zeros_like_variable(self, variable):
        """The gradient of a variable no VJP reached."""
        raise NotImplementedError

    @staticmethod
    def _is_float(value):
        """Whether `value` takes a cotangent (a float tensor)."""
        raise NotImplementedError


def accumulate(store, key, value):
    """Adds `value` to `store[key]` (sets it if absent; None adds nothing)."""
    if value is None:
        return
    store[key] = value if key not in store else store[key] + value
