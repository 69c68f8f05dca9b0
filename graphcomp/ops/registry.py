"""The op registry: each op is defined once with shape inference, a PyTorch reference
implementation, its lowering to TVM Relax and its MAC count.

An op definition reads its attributes from ``node.attrs``. Shape inference returns one
``(shape, dtype)`` pair per output. The PyTorch implementation takes the node and its input
tensors and returns a tensor (or a tuple for multi-output ops). The Relax lowering takes the
node and its inputs as Relax expressions and returns an expression (a tuple expression for
multi-output ops); TVM is imported only when a lowering runs.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable

from graphcomp.errors import GraphcompError

if TYPE_CHECKING:
    import numpy as np

    from graphcomp.ir import Node, Shape
    from graphcomp.ops.lowering import TargetFeatures

InferFn = Callable[["Node"], list[tuple["Shape", str]]]
TorchFn = Callable[..., Any]
RelaxFn = Callable[..., Any]
MacsFn = Callable[["Node"], int]
# pack(node, features) -> {input index: weight data in the layout the lowering wants}
PackFn = Callable[["Node", "TargetFeatures"], dict[int, "np.ndarray"]]


def _no_macs(node: "Node") -> int:
    return 0


@dataclass(frozen=True)
class OpDef:
    """One op kind: its name, input arity, the four functions every op provides, and
    optionally ``pack``, which requests weights in a target's layout (see lowering.py)."""

    name: str
    infer: InferFn
    torch: TorchFn
    relax: RelaxFn
    macs: MacsFn = _no_macs
    min_inputs: int = 1
    max_inputs: int = 1
    doc: str = ""
    pack: PackFn | None = None


_REGISTRY: dict[str, OpDef] = {}


def register_op(
    name: str,
    *,
    infer: InferFn,
    torch: TorchFn,
    relax: RelaxFn,
    macs: MacsFn = _no_macs,
    inputs: int | tuple[int, int] = 1,
    doc: str = "",
    pack: PackFn | None = None,
) -> OpDef:
    """Add an op to the registry. ``inputs`` is an exact count or a (min, max) range."""
    if name in _REGISTRY:
        raise ValueError(f"op '{name}' is already registered")
    low, high = (inputs, inputs) if isinstance(inputs, int) else inputs
    op = OpDef(name, infer, torch, relax, macs, low, high, doc, pack)
    _REGISTRY[name] = op
    return op


def get_op(name: str) -> OpDef:
    """Look up an op by name; raises GraphcompError naming the known ops when it is missing."""
    try:
        return _REGISTRY[name]
    except KeyError:
        known = ", ".join(sorted(_REGISTRY))
        raise GraphcompError(f"unknown op '{name}'; registered ops: {known}") from None


def unregister_op(name: str) -> None:
    """Remove an op from the registry (for tests and plugins that add ops temporarily)."""
    _REGISTRY.pop(name, None)


def registered_ops() -> dict[str, OpDef]:
    return dict(_REGISTRY)
