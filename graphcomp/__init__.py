"""graphcomp: import a trained model, compress it with verified passes, build it with TVM.

The public API lives in ``graphcomp.api`` and is importable from here (``graphcomp.load_model``);
it loads on first use because importing PyTorch and TVM takes seconds.
"""

__version__ = "0.1.0"

_API = {
    "CompileOptions", "Graph", "LoadedModel", "build", "compare_graphs", "compile_model",
    "format_graph", "load_artifact", "load_graph", "load_model", "node_rows", "run_pipeline",
    "run_reference", "save_graph",
}


def __getattr__(name: str):
    if name in _API:
        from graphcomp import api

        return getattr(api, name)
    raise AttributeError(f"module 'graphcomp' has no attribute '{name}'")
