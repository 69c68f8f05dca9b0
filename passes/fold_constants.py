"""Constant folding with the reference implementation of each op."""

from __future__ import annotations

import numpy as np
import torch

from graphcomp.ir import Constant, Graph, Node
from graphcomp.ops import get_op
from graphcomp.pipeline import Pass, PassContext, PassNodeError, PassResult, register_pass
from graphcomp.shapes import infer_node


@register_pass
class FoldConstants(Pass):
    """y = op(c1, c2, ...) with every input a constant -> constant y

    Runs each node whose inputs are all constants once, with the op's PyTorch reference
    implementation, and makes readers of its outputs read constants with the result, named
    after the outputs. Each folded constant has the dtype and shape that shape inference gives
    the output, whatever dtype the PyTorch computation returns, so folding never changes the
    type of a value. Folding repeats down chains of constant nodes in one pass.
    Exporters leave such chains behind (a weight transposed or reshaped at run time, shape
    arithmetic) and they cost time on every run. Nothing must run before it.

    Kept as they are: nodes that write a graph output (the interface names a node output), and
    results with more than ``max_elements`` elements (folding an ``expand`` can turn a scalar
    into a large tensor that bloats the artifact).

    Example::

        before:
          a: %c2 = mul(@c, @c) -> float32[]
          b: %y = add(%x, %c2) -> float32[2]
        after:
          b: %y = add(%x, @c2) -> float32[2]
    """

    name = "fold-constants"
    summary = "compute nodes whose inputs are all constants"
    options = {"max_elements": int}
    defaults = {"max_elements": 1 << 24}
    ranges = {"max_elements": (0, None)}

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        graph_outputs = {id(value) for value in graph.outputs}
        folded = 0
        skipped = 0
        for node in list(graph.nodes):
            if not node.inputs or not all(isinstance(v, Constant) for v in node.inputs):
                continue
            if any(id(v) in graph_outputs for v in node.outputs):
                continue
            if any(v.size > self.config["max_elements"] for v in node.outputs):
                skipped += 1
                ctx.log.debug("not folding '%s': output larger than %d elements", node.name,
                              self.config["max_elements"])
                continue
            for value, data in zip(node.outputs, evaluate(node)):
                graph.replace_uses(value, Constant(value.name, data))
            graph.remove_nodes([node])
            folded += 1
        return PassResult(changed=folded > 0, details={"folded": folded, "too_large": skipped})


def evaluate(node: Node) -> list[np.ndarray]:
    """Run ``node`` on its constant inputs; return arrays with the inferred shapes and dtypes."""
    # np.ascontiguousarray would turn a 0-d array into shape [1]; np.require keeps the shape.
    tensors = [torch.from_numpy(np.require(v.data, requirements="CW")) for v in node.inputs]
    with torch.no_grad():
        result = get_op(node.op).torch(node, *tensors)
    results = result if isinstance(result, (tuple, list)) else (result,)
    arrays = []
    for (shape, dtype), tensor in zip(infer_node(node), results):
        data = tensor.detach().cpu().numpy()
        if data.shape != tuple(shape):
            raise PassNodeError(
                node.name,
                f"node '{node.name}' (op {node.op}) computed shape {data.shape}, but shape "
                f"inference gives {tuple(shape)}; the op's reference and infer functions "
                "disagree",
            )
        arrays.append(np.require(data.astype(dtype, copy=False), requirements="C"))
    return arrays
