"""Export a graphcomp graph to a trainable ``torch.nn.Module``.

``GraphModule`` runs the graph with the registry's PyTorch implementations (through
``graphcomp.executor.run_torch``) and keeps the graph's constants as module state, so it can
be fine-tuned, for example by knowledge distillation after pruning, and turned back into a
graph with the trained values:

    module = to_torch(graph)
    optimizer = torch.optim.Adam(module.parameters(), lr=1e-4)
    ...                                    # train on module(x)
    tuned = module.to_graph()

Float constants in weight-like positions (see ``PARAMETER_INPUTS``) become ``nn.Parameter``s;
every other constant (batch-norm running statistics, shapes, indices, folded tensors) becomes a
buffer. ``trainable_constants="float"`` widens that to every finite float constant with more
than one element except batch-norm running statistics, which also covers the weight operand of
a matmul and folded tensors. Constants named ``conv1.weight`` cannot be attribute names, so
each gets a sanitized name (``conv1_weight``); ``constant_names`` maps it back.
"""

from __future__ import annotations

import logging
import re

import numpy as np
import torch

from graphcomp.errors import OptionError, ShapeError
from graphcomp.executor import run_torch
from graphcomp.ir import Constant, Graph, Node

logger = logging.getLogger(__name__)

# Input positions, per op, of the weights and biases that training should update. Batch norm's
# running mean and variance (inputs 3 and 4) are statistics, not weights, so they stay buffers.
# NOTE: with trainable_constants="weights", a constant operand of matmul (an ONNX MatMul with a
# weight) stays a buffer; pass trainable_constants="float" to train it.
PARAMETER_INPUTS: dict[str, tuple[int, ...]] = {
    "conv2d": (1, 2),
    "conv_transpose2d": (1, 2),
    "linear": (1, 2),
    "batch_norm": (1, 2),
    "layer_norm": (1, 2),
    "embedding": (1,),
}

# Inputs that hold statistics rather than weights; trainable_constants="float" keeps them buffers.
STATISTIC_INPUTS: dict[str, tuple[int, ...]] = {"batch_norm": (3, 4)}

# trainable_constants selectors: which constants become nn.Parameters.
TRAINABLE_SELECTORS = ("weights", "float")


class GraphModule(torch.nn.Module):
    """A graph as a PyTorch module whose parameters are the graph's weights.

    ``forward`` takes the graph inputs positionally, as tensors of the graph's static shapes,
    and returns one tensor, or a tuple for several graph outputs. The module keeps its own copy
    of ``graph``, so later edits to the argument do not change it.

    ``trainable_constants`` selects the parameters: ``"weights"`` (the inputs listed in
    ``PARAMETER_INPUTS``) or ``"float"`` (every finite float constant with more than one
    element, except the inputs listed in ``STATISTIC_INPUTS``).
    """

    def __init__(self, graph: Graph, trainable: bool = True,
                 trainable_constants: str = "weights"):
        super().__init__()
        if trainable_constants not in TRAINABLE_SELECTORS:
            raise OptionError(
                f"trainable_constants must be one of {list(TRAINABLE_SELECTORS)}, got "
                f"{trainable_constants!r}"
            )
        self.graph = graph.copy()
        # attribute name -> constant name, for parameters and buffers alike
        self.constant_names: dict[str, str] = {}
        # Keyed by the constant objects themselves (not ids), so copy.deepcopy of the module
        # maps the copied constants to the same attributes.
        self._attribute_of: dict[Constant, str] = {}
        if trainable_constants == "float":
            trained = _float_constants(self.graph)
        else:
            trained = _parameter_constants(self.graph)
        for const in self.graph.constants():
            attribute = self._attribute_name(const.name)
            tensor = torch.from_numpy(np.array(const.data, copy=True))
            if id(const) in trained:
                parameter = torch.nn.Parameter(tensor, requires_grad=trainable)
                self.register_parameter(attribute, parameter)
            else:
                self.register_buffer(attribute, tensor)
            self.constant_names[attribute] = const.name
            self._attribute_of[const] = attribute
        logger.debug("graph '%s' as a module: %d parameters, %d buffers", graph.name,
                     len(list(self.parameters())), len(list(self.buffers())))

    def _attribute_name(self, constant_name: str) -> str:
        base = re.sub(r"\W", "_", constant_name) or "constant"
        if base[0].isdigit():
            base = f"c_{base}"
        name = base
        index = 0
        while name in self.constant_names or hasattr(self, name):
            index += 1
            name = f"{base}_{index}"
        return name

    def forward(self, *inputs: torch.Tensor) -> torch.Tensor | tuple[torch.Tensor, ...]:
        graph = self.graph
        if len(inputs) != len(graph.inputs):
            names = [v.name for v in graph.inputs]
            raise ShapeError(
                f"graph '{graph.name}' takes {len(names)} inputs {names}, got {len(inputs)}"
            )
        for value, tensor in zip(graph.inputs, inputs):
            if tuple(tensor.shape) != value.shape:
                raise ShapeError(
                    f"input '{value.name}' has shape {tuple(tensor.shape)}, but graph "
                    f"'{graph.name}' expects {value.shape} (graph shapes are static)"
                )
        feeds = {value.name: tensor for value, tensor in zip(graph.inputs, inputs)}
        outputs = run_torch(graph, feeds, constant_tensors=self.constant_tensors())
        results = tuple(outputs[value] for value in graph.outputs)
        return results[0] if len(results) == 1 else results

    def constant_tensors(self) -> dict[Constant, torch.Tensor]:
        """Return the current parameter or buffer of each constant of the module's graph."""
        return {const: getattr(self, name) for const, name in self._attribute_of.items()}

    def to_graph(self) -> Graph:
        """Return a copy of the graph whose constants hold the current parameter and buffer
        values, each in its original dtype and name."""
        replacements: dict[int, Constant] = {}
        for const, tensor in self.constant_tensors().items():
            data = tensor.detach().cpu().numpy().astype(const.dtype, copy=True)
            replacements[id(const)] = Constant(const.name, data)
        result = self.graph.copy()
        # graph.copy() keeps node and output order, so positions identify the copied constants.
        for original, copied in zip(self.graph.nodes, result.nodes):
            for index, value in enumerate(original.inputs):
                if isinstance(value, Constant):
                    copied.inputs[index] = replacements[id(value)]
        for index, value in enumerate(self.graph.outputs):
            if isinstance(value, Constant):
                result.outputs[index] = replacements[id(value)]
        return result


def _parameter_constants(graph: Graph) -> set[int]:
    """Collect the ids of the float constants that some node reads in a weight-like position."""
    trained: set[int] = set()
    for node in graph.nodes:
        for index in PARAMETER_INPUTS.get(node.op, ()):
            if index < len(node.inputs) and _is_float_constant(node, index):
                trained.add(id(node.inputs[index]))
    return trained


def _float_constants(graph: Graph) -> set[int]:
    """Collect the ids of the finite float constants with more than one element, leaving out
    any constant that some node reads in a ``STATISTIC_INPUTS`` position."""
    statistics = {
        id(node.inputs[index])
        for node in graph.nodes
        for index in STATISTIC_INPUTS.get(node.op, ())
        if index < len(node.inputs)
    }
    return {
        id(const) for const in graph.constants()
        if id(const) not in statistics
        and np.issubdtype(np.dtype(const.dtype), np.floating)
        and const.data.size > 1
        and bool(np.isfinite(const.data).all())
    }


def _is_float_constant(node: Node, index: int) -> bool:
    value = node.inputs[index]
    return isinstance(value, Constant) and np.issubdtype(np.dtype(value.dtype), np.floating)


def to_torch(graph: Graph, trainable: bool = True,
             trainable_constants: str = "weights") -> GraphModule:
    """Wrap ``graph`` in a GraphModule (see its docstring)."""
    return GraphModule(graph, trainable, trainable_constants)
