"""Valid ranges of integer graph inputs that index a table (token ids into an embedding).

PyTorch raises for an embedding or gather index outside its table, but the TVM build clamps
(embedding) or wraps (gather) it and returns a plausible output. So graphcomp checks such
inputs before it runs a model: ``index_ranges`` finds them in a graph, the compiler checks
its verification data, and ``graphcomp run`` checks its inputs against the ranges that the
compiler recorded in the artifact's manifest.

An input is followed through ops that keep every element (identity, reshape, flatten,
transpose, expand, integer casts, concat) to the embedding or gather that reads it. Inputs
that reach a table only through arithmetic or slicing are not checked.
"""

from __future__ import annotations

from dataclasses import asdict, dataclass
from typing import Any, Mapping

import numpy as np

from graphcomp.errors import InputRangeError
from graphcomp.ir import Graph, Value

# Ops whose output contains every element of their first input (or of all inputs, for concat).
_ELEMENT_KEEPING_OPS = frozenset(
    {"identity", "reshape", "flatten", "transpose", "expand", "cast", "concat"}
)


@dataclass(frozen=True)
class IndexRange:
    """Graph input ``input`` indexes ``size`` entries of ``table`` at node ``node`` (op
    ``op``). Valid indices are [0, size), or [-size, size) when ``negative`` counts from the
    end (gather)."""

    input: str
    node: str
    op: str
    table: str
    size: int
    negative: bool

    @property
    def low(self) -> int:
        return -self.size if self.negative else 0

    def to_json(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_json(cls, item: Mapping[str, Any]) -> "IndexRange":
        return cls(str(item["input"]), str(item["node"]), str(item["op"]), str(item["table"]),
                   int(item["size"]), bool(item["negative"]))


def index_ranges(graph: Graph) -> list[IndexRange]:
    """Return the range of every integer graph input that an embedding or gather reads."""
    consumers = graph.consumers()
    ranges = []
    for graph_input in graph.inputs:
        if not np.issubdtype(np.dtype(graph_input.dtype), np.integer):
            continue
        for value in _element_keeping_closure(graph_input, consumers):
            for node in consumers.get(value, []):
                found = _range_at(graph_input.name, value, node)
                if found is not None:
                    ranges.append(found)
    return ranges


def _element_keeping_closure(start: Value, consumers) -> list[Value]:
    """Return ``start`` and every value that contains all its elements, in the order found."""
    found, pending = [start], [start]
    while pending:
        value = pending.pop()
        for node in consumers.get(value, []):
            if node.op not in _ELEMENT_KEEPING_OPS:
                continue
            if node.op != "concat" and node.inputs[0] is not value:
                continue
            output = node.outputs[0]
            if np.issubdtype(np.dtype(output.dtype), np.integer) and output not in found:
                found.append(output)
                pending.append(output)
    return found


def _range_at(input_name: str, value: Value, node) -> IndexRange | None:
    if node.op == "embedding" and node.inputs[0] is value:
        table = node.inputs[1]
        return IndexRange(input_name, node.name, node.op, table.name, table.shape[0], False)
    if node.op == "gather" and node.inputs[1] is value:
        data = node.inputs[0]
        axis = int(node.attrs.get("axis", 0)) % data.rank
        return IndexRange(input_name, node.name, node.op, data.name, data.shape[axis], True)
    return None


def check_index_inputs(
    ranges: list[IndexRange], feeds: Mapping[str, np.ndarray], where: str
) -> None:
    """Raise InputRangeError for the first feed that contains an index outside its range.

    ``where`` names the inputs' origin in the message (a file, ``--input x=ids.npy``).
    """
    for index_range in ranges:
        array = feeds.get(index_range.input)
        if array is None or array.size == 0:
            continue
        array = np.asarray(array)
        outside = (array < index_range.low) | (array >= index_range.size)
        if not outside.any():
            continue
        position = tuple(int(i) for i in np.argwhere(outside)[0])
        raise InputRangeError(
            f"{where}: input '{index_range.input}' contains {int(outside.sum())} index(es) "
            f"outside [{index_range.low}, {index_range.size}), first {int(array[position])} at "
            f"{list(position)}; node '{index_range.node}' (op {index_range.op}) uses it to "
            f"index '{index_range.table}', which has {index_range.size} entries. Give indices "
            "in that range (for a text model: token ids from the model's own tokenizer)"
        )
