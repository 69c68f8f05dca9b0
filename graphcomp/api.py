"""The Python API in one place: load a model, run a pipeline, build, compile, inspect.

Everything the CLI does goes through these functions::

    import graphcomp

    model = graphcomp.load_model("zoo:ppocr-cls")        # graph + original model as reference
    result = graphcomp.run_pipeline(model.graph, "fold-bn,fuse,dce")
    built = graphcomp.build(result.graph, target="cpu")   # TVM, untuned
    outputs = built.run({"x": x})
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import numpy as np

from graphcomp.compiler import CompileOptions, compile_model
from graphcomp.executor import run as run_reference
from graphcomp.inspect import compare_graphs, node_rows
from graphcomp.ir import Graph
from graphcomp.models_io import LoadedModel, load_model
from graphcomp.serialize import format_graph, load_graph, save_graph

__all__ = [
    "CompileOptions", "Graph", "LoadedModel", "build", "compare_graphs", "compile_model",
    "format_graph", "load_artifact", "load_graph", "load_model", "node_rows", "run_pipeline",
    "run_reference", "save_graph",
]


def run_pipeline(
    graph: Graph, pipeline: str | None = None, feeds: dict[str, np.ndarray] | None = None,
    verify: bool = True, tolerance: float = 1e-4, dump_dir: str | Path | None = None,
    target: str | None = None,
):
    """Run a pipeline (the default one when ``pipeline`` is None) on a copy of ``graph``;
    with ``feeds``, check each pass numerically against the graph before it. ``target``
    names the build target that passes may base decisions on (``lowrank`` times its
    candidate layers there)."""
    from graphcomp.pipeline import DEFAULT_PIPELINE, PassManager, parse_pipeline

    passes = parse_pipeline(DEFAULT_PIPELINE if pipeline is None else pipeline)
    manager = PassManager(
        passes, verify=verify and feeds is not None, tolerance=tolerance, feeds=feeds,
        dump_dir=Path(dump_dir) if dump_dir is not None else None, target=target,
    )
    return manager.run(graph)


def build(graph: Graph, target: str = "cpu") -> Any:
    """Lower ``graph`` to TVM Relax and build it for ``target``; returns a runnable model."""
    from graphcomp.backends import tvm as tvm_backend

    return tvm_backend.build(graph, target)


def load_artifact(path: str | Path) -> Any:
    """Load an artifact folder written by ``compile_model`` or ``built.export``."""
    from graphcomp.backends import tvm as tvm_backend

    return tvm_backend.load_artifact(Path(path))
