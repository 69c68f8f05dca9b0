"""graphcomp's graph IR: a Graph of Nodes that read and write Values; Constants hold weights.

Vocabulary, used the same way everywhere in graphcomp:

- value: a tensor with a static shape and a dtype, produced by one node or a graph input.
- constant: a value whose data is known (a numpy array): weights, biases, folded tensors.
- node: one application of an op to input values, producing output values.
- op: the operator kind, defined once in the op registry (``graphcomp.ops``).
- graph: nodes in topological order, with graph inputs and graph outputs.

All shapes are static. Frontends fix dynamic dims and fold shape computations before they
build a graph, so passes and backends never see a symbolic dim.
"""

from __future__ import annotations

import copy
import itertools
from dataclasses import dataclass, field
from typing import Any, Iterable, Iterator

import numpy as np

Shape = tuple[int, ...]


@dataclass(eq=False)
class Value:
    """A tensor in the graph: a name, a static shape and a numpy dtype name."""

    name: str
    shape: Shape
    dtype: str = "float32"

    def __post_init__(self) -> None:
        self.shape = tuple(int(d) for d in self.shape)
        self.dtype = str(np.dtype(self.dtype))

    @property
    def size(self) -> int:
        return int(np.prod(self.shape, dtype=np.int64))

    @property
    def rank(self) -> int:
        return len(self.shape)

    def type_str(self) -> str:
        return f"{self.dtype}[{','.join(str(d) for d in self.shape)}]"

    def __repr__(self) -> str:
        return f"Value(%{self.name}: {self.type_str()})"


class Constant(Value):
    """A value whose data is known. Treat ``data`` as immutable: passes build new arrays."""

    def __init__(self, name: str, data: np.ndarray):
        data = np.asarray(data)
        super().__init__(name, data.shape, str(data.dtype))
        self.data = data

    @property
    def nbytes(self) -> int:
        return int(self.data.nbytes)

    def __repr__(self) -> str:
        return f"Constant(%{self.name}: {self.type_str()})"


@dataclass(eq=False)
class Node:
    """One op applied to input values. ``created_by`` names the pass (or frontend) that made it."""

    name: str
    op: str
    inputs: list[Value]
    outputs: list[Value]
    attrs: dict[str, Any] = field(default_factory=dict)
    created_by: str = "import"

    @property
    def output(self) -> Value:
        """The single output of a one-output node."""
        if len(self.outputs) != 1:
            raise ValueError(f"node '{self.name}' ({self.op}) has {len(self.outputs)} outputs")
        return self.outputs[0]

    def __repr__(self) -> str:
        return f"Node({self.name}: {self.op})"


class Graph:
    """Nodes in topological order between graph inputs and graph outputs.

    Producer and consumer maps are computed on demand, so a pass may edit ``nodes`` freely and
    call ``sort()`` (or rely on the verifier) afterwards.
    """

    def __init__(
        self,
        name: str,
        inputs: list[Value],
        outputs: list[Value],
        nodes: list[Node],
        metadata: dict[str, Any] | None = None,
    ):
        self.name = name
        self.inputs = list(inputs)
        self.outputs = list(outputs)
        self.nodes = list(nodes)
        # Facts about where the graph came from (source file, frontend, opset); never analyses.
        self.metadata: dict[str, Any] = dict(metadata or {})
        self._name_counter = itertools.count()

    # --- queries -------------------------------------------------------------------------------

    def producers(self) -> dict[Value, Node]:
        return {out: node for node in self.nodes for out in node.outputs}

    def consumers(self) -> dict[Value, list[Node]]:
        users: dict[Value, list[Node]] = {}
        for node in self.nodes:
            for value in node.inputs:
                users.setdefault(value, []).append(node)
        return users

    def constants(self) -> list[Constant]:
        """Return every constant read by a node or returned as a graph output, each once."""
        seen: dict[int, Constant] = {}
        for value in itertools.chain((v for n in self.nodes for v in n.inputs), self.outputs):
            if isinstance(value, Constant):
                seen.setdefault(id(value), value)
        return list(seen.values())

    def values(self) -> list[Value]:
        """Return all values (graph inputs, constants, node outputs), each once."""
        seen: dict[int, Value] = {}
        for value in itertools.chain(
            self.inputs, (v for n in self.nodes for v in (*n.inputs, *n.outputs))
        ):
            seen.setdefault(id(value), value)
        return list(seen.values())

    def node(self, name: str) -> Node:
        for node in self.nodes:
            if node.name == name:
                return node
        raise KeyError(f"no node named '{name}' in graph '{self.name}'")

    def __iter__(self) -> Iterator[Node]:
        return iter(self.nodes)

    def __len__(self) -> int:
        return len(self.nodes)

    # --- edits ---------------------------------------------------------------------------------

    def unique_name(self, base: str) -> str:
        """Return a node or value name starting with ``base`` that no value or node uses yet."""
        taken = {v.name for v in self.values()} | {n.name for n in self.nodes}
        if base not in taken:
            return base
        while True:
            candidate = f"{base}_{next(self._name_counter)}"
            if candidate not in taken:
                return candidate

    def replace_uses(self, old: Value, new: Value) -> int:
        """Make every node and graph output that reads ``old`` read ``new``; return the count."""
        count = 0
        for node in self.nodes:
            for i, value in enumerate(node.inputs):
                if value is old:
                    node.inputs[i] = new
                    count += 1
        for i, value in enumerate(self.outputs):
            if value is old:
                # Keep the graph output's name stable for users and exporters.
                self.outputs[i] = new
                count += 1
        return count

    def remove_nodes(self, doomed: Iterable[Node]) -> None:
        doomed_ids = {id(n) for n in doomed}
        self.nodes = [n for n in self.nodes if id(n) not in doomed_ids]

    def insert_before(self, anchor: Node, new_nodes: list[Node]) -> None:
        index = next(i for i, n in enumerate(self.nodes) if n is anchor)
        self.nodes[index:index] = new_nodes

    def sort(self) -> None:
        """Order nodes topologically, keeping the current order where dependencies allow."""
        produced_by = self.producers()
        order: list[Node] = []
        state: dict[int, int] = {}  # 1 = on the stack, 2 = emitted

        for root in self.nodes:
            if state.get(id(root)) == 2:
                continue
            stack: list[tuple[Node, int]] = [(root, 0)]
            while stack:
                node, next_input = stack.pop()
                if next_input == 0:
                    if state.get(id(node)) == 2:
                        continue
                    state[id(node)] = 1
                if next_input < len(node.inputs):
                    stack.append((node, next_input + 1))
                    parent = produced_by.get(node.inputs[next_input])
                    if parent is not None and state.get(id(parent)) != 2:
                        if state.get(id(parent)) == 1:
                            raise ValueError(
                                f"graph '{self.name}' has a cycle through '{node.name}'"
                            )
                        stack.append((parent, 0))
                else:
                    state[id(node)] = 2
                    order.append(node)
        self.nodes = order

    def copy(self) -> "Graph":
        """Return a structural deep copy. Constant arrays are shared, which is safe because passes never
        change a constant's data in place."""
        memo: dict[int, Any] = {}
        for const in self.constants():
            clone = Constant.__new__(Constant)
            clone.__dict__.update(const.__dict__)
            memo[id(const)] = clone
        return copy.deepcopy(self, memo)

    def __repr__(self) -> str:
        return f"Graph({self.name}: {len(self.nodes)} nodes)"
