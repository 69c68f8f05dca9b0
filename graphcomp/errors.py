"""Typed errors. Every error a user can cause derives from GraphcompError (CLI exit code 2)."""

from __future__ import annotations


class GraphcompError(Exception):
    """An error caused by the input (model, options, files); the CLI exits with code 2."""

    exit_code = 2


class ModelLoadError(GraphcompError):
    """The model file is missing, unreadable or not a valid model."""


class UnsupportedOpError(GraphcompError):
    """The model uses ops that graphcomp cannot import; lists all of them at once."""

    def __init__(self, source: str, unsupported: list[tuple[str, str, list[str]]]):
        # unsupported: (op type, domain/opset text, node names) per op type.
        self.source = source
        self.unsupported = unsupported
        lines = [f"{source}: {len(unsupported)} unsupported op type(s):"]
        for op_type, where, names in unsupported:
            shown = ", ".join(names[:5]) + (f" and {len(names) - 5} more" if len(names) > 5 else "")
            lines.append(f"  {op_type} ({where}) at node(s) {shown}")
        lines.append(
            "Add the op to graphcomp's op registry and frontend, or replace it in the model."
        )
        super().__init__("\n".join(lines))


class ShapeError(GraphcompError):
    """A shape is missing, dynamic where a static one is needed, or inconsistent."""


class OptionError(GraphcompError):
    """A command-line or pipeline option is invalid."""


class VerificationError(GraphcompError):
    """The graph is malformed (verifier) or a result does not match its reference."""


class PassError(GraphcompError):
    """A pass failed; names the pass, the passes already run and the node at fault."""

    def __init__(self, pass_name: str, already_run: list[str], node: str | None, cause: str,
                 package: str | None = None):
        # package: the distribution of a plugin pass, None for graphcomp's own passes.
        self.pass_name = pass_name
        self.already_run = list(already_run)
        self.node = node
        self.package = package
        origin = f" (from package {package})" if package else ""
        where = f" at node '{node}'" if node else ""
        before = ", ".join(already_run) if already_run else "none"
        super().__init__(
            f"pass '{pass_name}'{origin} failed{where}: {cause} (passes already run: {before})"
        )


class BackendError(GraphcompError):
    """Lowering or building for a target failed."""


class ArtifactError(GraphcompError):
    """An artifact folder is missing files, corrupt, or built for another target or version."""


class InputRangeError(GraphcompError):
    """An integer input contains an index outside the table it indexes (a token id at or above
    the vocabulary size)."""


class InputValueError(GraphcompError):
    """An input array has a dtype of another kind than the graph input's (an integer array for
    a float input), integers that the input's dtype cannot hold, or NaN or infinite values."""
