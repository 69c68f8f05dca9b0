"""The reference executor: runs a graph with each op's PyTorch implementation.

It is the numerical reference for every pass and backend. It runs on the CPU in float32 (or
the graph's own dtypes) under ``torch.no_grad()`` unless ``grad=True``, which keeps autograd
on for calibration or fine-tuning callers.
"""

from __future__ import annotations

from typing import Mapping

import numpy as np
import torch

from graphcomp.errors import GraphcompError, ShapeError
from graphcomp.ir import Constant, Graph, Value
from graphcomp.ops import get_op


def check_feeds(graph: Graph, feeds: Mapping[str, np.ndarray]) -> None:
    """Raise a ShapeError unless ``feeds`` has exactly the graph inputs with their shapes."""
    expected = {v.name: v for v in graph.inputs}
    missing = [name for name in expected if name not in feeds]
    extra = [name for name in feeds if name not in expected]
    if missing or extra:
        raise ShapeError(
            f"graph '{graph.name}' expects inputs {sorted(expected)}; missing {missing}, "
            f"unexpected {extra}"
        )
    for name, value in expected.items():
        shape = tuple(np.shape(feeds[name]))
        if shape != value.shape:
            raise ShapeError(
                f"input '{name}' has shape {shape}, but graph '{graph.name}' expects {value.shape}"
            )


def run_torch(
    graph: Graph,
    feeds: Mapping[str, torch.Tensor],
    keep: bool = False,
    constant_tensors: Mapping[Value, torch.Tensor] | None = None,
) -> dict[Value, torch.Tensor]:
    """Run ``graph`` on torch tensors; return the graph outputs (every value when ``keep``).

    ``constant_tensors`` supplies tensors for some constants in place of their numpy data, for
    example trainable parameters that gradients must reach.
    """
    env: dict[Value, torch.Tensor] = dict(constant_tensors or {})
    for value in graph.inputs:
        env[value] = feeds[value.name]
    remaining_uses = _use_counts(graph) if not keep else None

    for node in graph.nodes:
        args = []
        for value in node.inputs:
            if isinstance(value, Constant) and value not in env:
                env[value] = torch.from_numpy(np.require(value.data, requirements="C"))
            args.append(env[value])
        try:
            result = get_op(node.op).torch(node, *args)
        except GraphcompError:
            raise
        except Exception as exc:
            raise GraphcompError(
                f"reference executor failed at node '{node.name}' (op {node.op}): {exc}"
            ) from exc
        results = result if isinstance(result, (tuple, list)) else (result,)
        for value, tensor in zip(node.outputs, results):
            env[value] = tensor
        if remaining_uses is not None:
            _release(node, env, remaining_uses, graph)

    if keep:
        return env
    return {value: env[value] for value in graph.outputs}


def run(graph: Graph, feeds: Mapping[str, np.ndarray], grad: bool = False) -> dict[str, np.ndarray]:
    """Run ``graph`` on numpy inputs; return its outputs by name as numpy arrays."""
    check_feeds(graph, feeds)
    tensors = {
        name: torch.from_numpy(np.require(array, requirements="C")) for name, array in feeds.items()
    }
    with torch.set_grad_enabled(grad):
        outputs = run_torch(graph, tensors)
    return {value.name: outputs[value].detach().numpy() for value in graph.outputs}


def _use_counts(graph: Graph) -> dict[Value, int]:
    counts: dict[Value, int] = {}
    for node in graph.nodes:
        for value in node.inputs:
            counts[value] = counts.get(value, 0) + 1
    for value in graph.outputs:
        counts[value] = counts.get(value, 0) + 1
    return counts


def _release(node, env, remaining_uses, graph) -> None:
    # Free intermediate tensors after their last use so large models fit in memory.
    for value in node.inputs:
        remaining_uses[value] -= 1
        if remaining_uses[value] == 0 and not isinstance(value, Constant):
            env.pop(value, None)
