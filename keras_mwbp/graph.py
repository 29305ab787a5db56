"""What each loss of a functional multi-head model depends on.

`HeadGraph` reads a Keras functional graph once, at model construction: the
nodes in execution order, which nodes (and so which trainable variables) each
output depends on, and the depth of each head's tap (weight layers on the
longest path from the input, the head's own layers excluded).
"""

import collections

import keras

from keras_mwbp import _compat


def check_outputs_depend_on_inputs(inputs, outputs):
    """Raises `ValueError` if an output cannot be computed from `inputs`.

    Args:
        inputs: Flat list of the model's input `KerasTensor`s.
        outputs: Flat list of the model's output tensors.
    """
    input_ids = {id(x) for x in inputs}
    for index, output in enumerate(outputs):
        if not isinstance(output, keras.KerasTensor):
            raise ValueError(
                "Every entry of `outputs` must be a symbolic tensor computed "
                f"from `inputs`. Received: outputs[{index}]={output!r}"
            )
        leaves = _leaf_tensors(output)
        foreign = [x for x in leaves if id(x) not in input_ids]
        if foreign or not leaves:
            raise ValueError(
                "Every entry of `outputs` must depend on `inputs` only. "
                f"Received: outputs[{index}]={output!r} depends on "
                f"{foreign or 'no input'} which is not in `inputs`."
            )


def upstream_tensors(tensor):
    """Every symbolic tensor `tensor` is computed from, itself included.

    Returns:
        A dict from `id()` to tensor; input tensors (made by no operation)
        are those whose `producing_node(tensor)` is `None`.
    """
    found, stack = {}, [tensor]
    while stack:
        x = stack.pop()
        if id(x) in found:
            continue
        found[id(x)] = x
        node = producing_node(x)
        if node is not None:
            stack.extend(node.input_tensors)
    return found


def producing_node(tensor):
    """The non-input node that computed `tensor`, or `None`."""
    node = _compat.producing_node(tensor)
    return None if node is None or node.is_input else node


def _leaf_tensors(tensor):
    """Input tensors (tensors made by no operation) behind `tensor`."""
    return [
        x for x in upstream_tensors(tensor).values()
        if producing_node(x) is None
    ]


def is_weight_layer(operation):
    """Whether an operation counts as one weight layer (convolution/dense)."""
    return any(
        v.name.endswith("kernel")
        for v in getattr(operation, "weights", [])
    )


def ordered_nodes(function):
    """Non-input nodes of a Keras `Function`/`Functional`, in run order."""
    nodes_by_depth = _compat.nodes_by_depth(function)
    return [
        node
        for depth in sorted(nodes_by_depth, reverse=True)
        for node in nodes_by_depth[depth]
        if node.operation is not None and not node.is_input
    ]


def weight_depth(operation):
    """Weight layers on the longest path through `operation`."""
    if _compat.nodes_by_depth(operation) is not None:  # A nested model.
        depths = _tensor_weight_depths(operation)
        return max(depths.get(id(x), 0) for x in operation.outputs)
    return int(is_weight_layer(operation))


def _tensor_weight_depths(function):
    depths = {id(x): 0 for x in function.inputs}
    for node in ordered_nodes(function):
        below = max((depths.get(id(x), 0) for x in node.input_tensors),
                    default=0)
        for x in node.outputs:
            depths[id(x)] = below + weight_depth(node.operation)
    return depths


class HeadGraph:
    """Static facts about the losses of a multi-output functional model.

    Args:
        model: A built Keras functional model whose outputs are the heads,
            shallowest first and final last.

    Attributes:
        nodes: Non-input nodes in run order.
        producer: Maps `id(tensor)` to the index of the node computing it.
        consumers: Maps `id(tensor)` to the number of nodes (and losses)
            using it.
        ancestors: For each output, the frozenset of node indices it needs.
        loss_variables: For each output, the trainable variables its loss
            depends on, in `model.trainable_variables` order.
        segments: For each output, the variables its loss is the first to
            depend on (Relay BP's segments: the trunk since the previous tap
            and the head).
        depths: Tap depth of each head; the final entry is the depth of the
            whole network.
    """

    def __init__(self, model):
        self.nodes = ordered_nodes(model)
        self.producer = {}
        for index, node in enumerate(self.nodes):
            for x in node.outputs:
                self.producer[id(x)] = index
        self.output_ids = tuple(id(out) for out in model.outputs)
        self.consumers = collections.Counter(self.output_ids)
        for node in self.nodes:
            self.consumers.update({id(x) for x in node.input_tensors})
        self.ancestors = tuple(
            frozenset(self._ancestors_of(out)) for out in model.outputs
        )
        trainable = model.trainable_variables
        self.loss_variables = tuple(
            self._variables_of(nodes, trainable) for nodes in self.ancestors
        )
        seen = set()
        segments = []
        for variables in self.loss_variables:
            segments.append([v for v in variables if id(v) not in seen])
            seen.update(id(v) for v in variables)
        self.segments = tuple(segments)
        self.depths = self._head_depths(model)

    def node_variables(self, index):
        """Trainable variables of node `index`."""
        return list(getattr(self.nodes[index].operation,
                            "trainable_variables", []))

    def region(self, index, updated_ids):
        """Nodes of loss `index` whose backward must be re-linearized.

        These are the nodes with a variable in `updated_ids` (already updated
        in this step) and every node below them; above them, the forward
        pass's own graph is exact.

        Args:
            index: Output index of the loss.
            updated_ids: `id()`s of the variables updated so far in the step.

        Returns:
            A frozenset of node indices.
        """
        touched = [
            n
            for n in self.ancestors[index]
            if any(id(v) in updated_ids for v in self.node_variables(n))
        ]
        region = set()
        for n in touched:
            if n not in region:
                region |= self._ancestors_of_node(n)
        return frozenset(region)

    def _ancestors_of_node(self, index):
        return {index}.union(
            *(self._ancestors_of(x) for x in self.nodes[index].input_tensors)
        )

    def _ancestors_of(self, tensor):
        found, stack = set(), [tensor]
        while stack:
            index = self.producer.get(id(stack.pop()))
            if index is None or index in found:
                continue
            found.add(index)
            stack.extend(self.nodes[index].input_tensors)
        return found

    def _variables_of(self, node_indices, trainable):
        ids = {
            id(v) for index in node_indices for v in self.node_variables(index)
        }
        return [v for v in trainable if id(v) in ids]

    def _head_depths(self, model):
        depth_of = _tensor_weight_depths(model)
        final_nodes = self.ancestors[-1]
        depths = []
        for output, nodes in zip(model.outputs[:-1], self.ancestors[:-1]):
            own = nodes - final_nodes
            taps = [
                x
                for index in own
                for x in self.nodes[index].input_tensors
                if self.producer.get(id(x)) not in own
            ]
            if not own:
                taps = [output]
            depths.append(max(depth_of.get(id(x), 0) for x in taps))
        depths.append(depth_of[id(model.outputs[-1])])
        return tuple(depths)
