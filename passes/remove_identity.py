"""Removal of nodes that return their input unchanged."""

from __future__ import annotations

from graphcomp.ir import Constant, Graph, Node, Value
from graphcomp.patterns import GraphIndex, bypass_node, constant_equals
from graphcomp.pipeline import Pass, PassContext, PassResult, register_pass

# Ops that return their input whenever the output has the input's shape and dtype.
_SHAPE_OPS = ("cast", "reshape", "flatten", "expand")


@register_pass
class RemoveIdentity(Pass):
    """y = f(x) with f the identity on x -> readers of y read x

    Removes these nodes:

    - identity ops (the frontends already drop inference-mode dropout, so it never gets here),
    - casts to the input's dtype, and reshape, flatten and expand to the input's shape,
    - transposes with the identity permutation and slices that take everything,
    - pads of zero width, one-input concats, one-piece splits and clips without bounds,
    - x + 0, 0 + x, x - 0, x * 1, 1 * x and x / 1 with a constant 0 or 1 that leaves the
      shape and dtype of x unchanged.

    Exporters and other passes leave such nodes behind. Removing them saves a copy each and
    exposes patterns to the later passes: a batch_norm after an identity after a conv folds
    only once the identity is gone. Nothing must run before it.

    A node that writes a graph output is removed only when its input can take over the
    output's name, that is when another node produces it and it is not a graph output itself.

    Does not cover yet: pairs that cancel (transpose and its inverse, reshape there and back).

    Example::

        before:
          a: %t = identity(%x) -> float32[2,3]
          b: %u = mul(%t, @one) -> float32[2,3]
          c: %y = relu(%u) -> float32[2,3]
        after:
          c: %y = relu(%x) -> float32[2,3]
    """

    name = "remove-identity"
    summary = "remove identity ops, no-op casts, reshapes, transposes and slices, x+0, x*1"

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        removed: dict[str, int] = {}
        for node in list(graph.nodes):
            source = identity_input(node)
            if source is None:
                continue
            # Rebuilt for each removal because the previous one changed readers and outputs.
            if bypass_node(graph, GraphIndex(graph), node, source):
                removed[node.op] = removed.get(node.op, 0) + 1
        total = sum(removed.values())
        return PassResult(changed=total > 0, details={"removed": total, **removed})


def identity_input(node: Node) -> Value | None:
    """Return the input that ``node`` passes through unchanged, or None."""
    if len(node.outputs) != 1 or not node.inputs:
        return None
    if node.op == "identity":
        return node.inputs[0]
    if node.op in ("add", "sub", "mul", "div"):
        return _neutral_operand_input(node)
    source = node.inputs[0]
    if not _same_type(source, node.output):
        return None
    attrs = node.attrs
    passes_through = {
        "transpose": lambda: list(attrs["perm"]) == list(range(source.rank)),
        "slice": lambda: all(int(step) > 0 for step in attrs.get("steps", [1])),
        "pad": lambda: not any(int(p) for p in attrs["pads"]),
        "concat": lambda: len(node.inputs) == 1,
        "split": lambda: True,
        "clip": lambda: attrs.get("min") is None and attrs.get("max") is None,
    }
    if node.op in _SHAPE_OPS:
        return source
    check = passes_through.get(node.op)
    return source if check is not None and check() else None


def _neutral_operand_input(node: Node) -> Value | None:
    # x + 0 and 0 + x, x - 0, x * 1 and 1 * x, x / 1: (position of the constant, its value).
    neutral = {"add": ((1, 0.0), (0, 0.0)), "sub": ((1, 0.0),),
               "mul": ((1, 1.0), (0, 1.0)), "div": ((1, 1.0),)}[node.op]
    for position, number in neutral:
        constant = node.inputs[position]
        source = node.inputs[1 - position]
        if (
            isinstance(constant, Constant)
            and constant_equals(constant, number)
            and _same_type(source, node.output)
        ):
            return source
    return None


def _same_type(source: Value, output: Value) -> bool:
    return source.shape == output.shape and source.dtype == output.dtype
