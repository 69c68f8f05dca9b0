"""graphcomp's TVM backend: graph -> Relax -> compiled library for a target -> run.

Importing this package is cheap; TVM itself is imported on first use.
"""

from .artifact import load_artifact
from .lower import lower_to_relax
from .model import BuiltModel, build
from .targets import list_targets, resolve_target
from .tuning import RpcOptions, TuningOptions, TuningProgress, TuningResult, tune

__all__ = [
    "BuiltModel",
    "build",
    "list_targets",
    "load_artifact",
    "lower_to_relax",
    "resolve_target",
    "RpcOptions",
    "TuningOptions",
    "TuningProgress",
    "TuningResult",
    "tune",
]
