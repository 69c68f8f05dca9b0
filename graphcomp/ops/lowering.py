"""The build state that an op's Relax lowering may read besides its node: the target's features,
and the weights that ``lower_to_relax`` gave it in another layout.

An op may register a ``pack`` function: ``pack(node, features)`` returns, per input index, a
weight's data in the layout the op's lowering wants on a target with ``features`` (or an
empty dict). ``lower_to_relax`` makes each packed array a parameter of ``main``, as it does
for other weights, and keeps the original constant a parameter only while some node still
reads it unpacked. While the node lowers, ``packed_input(node, index)`` returns the Relax
variable of its packed weight.
"""

from __future__ import annotations

from collections.abc import Iterator, Mapping
from contextlib import contextmanager
from contextvars import ContextVar
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from graphcomp.ir import Node


@dataclass(frozen=True)
class TargetFeatures:
    """Instructions of the build target that change how ops lower."""

    # x86 AVX-512 VNNI: vpdpbusd sums four uint8 x int8 products into each of 16 int32 lanes.
    vnni: bool = False


@dataclass
class Lowering:
    """The state of one ``lower_to_relax`` call that op lowerings may read."""

    features: TargetFeatures = field(default_factory=TargetFeatures)
    # (id(node), input index) -> the Relax variable of that input's packed weight
    packed: Mapping[tuple[int, int], Any] = field(default_factory=dict)


_CURRENT: ContextVar[Lowering | None] = ContextVar("graphcomp_lowering", default=None)


@contextmanager
def lowering(state: Lowering) -> Iterator[Lowering]:
    """Make ``state`` visible to op lowerings for the duration of the block."""
    token = _CURRENT.set(state)
    try:
        yield state
    finally:
        _CURRENT.reset(token)


def packed_input(node: "Node", index: int) -> Any:
    """Return the Relax variable of input ``index`` of ``node`` in its packed layout, or None
    when the input is not packed (or no ``lower_to_relax`` is running)."""
    state = _CURRENT.get()
    return None if state is None else state.packed.get((id(node), index))
