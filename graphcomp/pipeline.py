"""Passes, the pass registry, pipeline text and the pass manager.

A pass is a ``Pass`` subclass registered with ``@register_pass``; the built-in passes live in
``graphcomp.passes``, one per module, and other packages add passes through the entry-point
group ``graphcomp.passes``. A pipeline is written as text, passes separated by commas
(or new lines), each with options after colons::

    fold-constants,remove-identity,fold-bn,fuse,dce
    prune:ratio=0.5:global=true
    quantize:int8

``PassManager`` runs the passes on a copy of a graph. Before the first pass it checks each
pass's requirements (``graphcomp.contract``). After each pass it checks the graph's structure
with the verifier, the pass's declared contract and, given input feeds, compares the outputs
of the reference executor before and after the pass.
"""

from __future__ import annotations

import difflib
import importlib
import importlib.metadata
import logging
import math
import pkgutil
import time
import types
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Callable, ClassVar, Mapping, Sequence

import numpy as np

from graphcomp import executor
from graphcomp.contract import PROPERTIES, Fingerprint, broken_properties, state_of
from graphcomp.errors import GraphcompError, OptionError, PassError, VerificationError
from graphcomp.ir import Graph
from graphcomp.serialize import format_graph, write_text_atomic
from graphcomp.verifier import verify_graph

logger = logging.getLogger(__name__)

# The lossless default, one pass per line.
DEFAULT_PIPELINE = ",".join((
    "fold-constants",   # compute nodes whose inputs are all constants
    "remove-identity",  # drop identities, no-op casts, reshapes, transposes, x+0, x*1
    "fold-bn",          # fold batch_norm into the conv2d, conv_transpose2d or linear before it
    "fuse",             # bias adds, hardswish/hardsigmoid patterns, activations into convs
    "dce",              # remove nodes whose outputs are never read
))

OPTION_TYPES = (int, float, bool, str)
_TRUE_WORDS = {"true": True, "1": True, "false": False, "0": False}


class PassNodeError(GraphcompError):
    """Raised inside a pass to name the node at fault; the manager wraps it in a PassError."""

    def __init__(self, node: str, message: str):
        self.node = node
        super().__init__(message)


@dataclass
class PassResult:
    """Outcome of a pass: whether the graph changed, and counts such as ``{"folded": 12}``."""

    changed: bool
    details: dict[str, Any] = field(default_factory=dict)


@dataclass
class PassContext:
    """Inputs a pass may use besides the graph: input feeds (for calibration or checks), the
    manager's error tolerance, a logger, calibration batches (each a feeds dict; None
    means calibrate on ``feeds``), and the named build target (``cpu``, ``arm``, ``cuda``...)
    that the graph will be compiled for, or None when none is known. A pass doing long work
    (calibration) calls ``progress``, when set, with a label, the units done and the total."""

    feeds: dict[str, np.ndarray] | None = None
    tolerance: float = 1e-4
    log: logging.Logger = logger
    calibration: Sequence[Mapping[str, np.ndarray]] | None = None
    target: str | None = None
    progress: Callable[[str, int, int], None] | None = None
    tuning_db: Path | None = None  # tuning database folder for timing on the target


class Pass:
    """Base class of passes. A subclass sets the class attributes and implements ``run``.

    ``options`` maps each accepted option to its type (int, float, bool or str) and
    ``defaults`` gives the values of options that are not set. ``ranges`` gives numeric options
    an inclusive (minimum, maximum) range, None for an open end; ``__init__`` rejects values
    outside it, and NaN for any float option. ``parse_word`` turns a bare word of the pipeline
    text into options. After ``__init__``, ``self.config`` contains every option's value.

    The contract, which the manager checks (``graphcomp.contract`` defines the properties):
    ``requires`` names properties that must hold, or passes that must run, before this one;
    ``establishes`` names properties that hold after it; ``invalidates`` names properties it
    may break, and it preserves all others. ``run`` returns a PassResult, or a bool, telling
    whether it changed the graph.
    """

    name: ClassVar[str]
    summary: ClassVar[str]
    requires: ClassVar[tuple[str, ...]] = ()
    establishes: ClassVar[tuple[str, ...]] = ()
    invalidates: ClassVar[tuple[str, ...]] = ()
    lossless: ClassVar[bool] = True
    options: ClassVar[dict[str, type]] = {}
    # Allowed values of str options that take one of a fixed set, shown by 'graphcomp passes'.
    choices: ClassVar[dict[str, tuple[str, ...]]] = {}
    defaults: ClassVar[dict[str, Any]] = {}
    ranges: ClassVar[dict[str, tuple[float | None, float | None]]] = {}

    def __init__(self, **options: Any):
        config = dict(self.defaults)
        for key, value in options.items():
            if key not in self.options:
                raise OptionError(
                    f"pass '{self.name}' has no option '{key}'; {self.describe_options()}"
                )
            config[key] = coerce_option(self.name, key, self.options[key], value)
            check_option_range(self.name, key, config[key], self.ranges.get(key))
        self.config = config

    @classmethod
    def parse_word(cls, word: str) -> dict[str, Any]:
        """Turn a bare word after the pass name into options. By default a bool option's name
        sets it to true; passes with modes (``quantize:int8``) override this."""
        if cls.options.get(word) is bool:
            return {word: True}
        raise OptionError(
            f"pass '{cls.name}' does not accept the word '{word}'; {cls.describe_options()}"
        )

    @classmethod
    def describe_options(cls) -> str:
        if not cls.options:
            return "it takes no options"
        accepted = ", ".join(f"{key} ({cls.option_kind(key)})" for key in cls.options)
        return f"accepted options: {accepted}"

    @classmethod
    def option_kind(cls, key: str) -> str:
        """Describe an option's values: its choices as ``a|b|c``, else its type name."""
        if key in cls.choices:
            return "|".join(cls.choices[key])
        return cls.options[key].__name__

    def uses_calibration(self) -> bool:
        """Return whether this pass, as configured, derives what it computes from input data
        (``PassContext.calibration`` or ``feeds``). The compiler verifies such a pipeline on
        batches held out from that data."""
        return False

    def run(self, graph: Graph, ctx: PassContext) -> PassResult:
        raise NotImplementedError(f"pass '{self.name}' does not implement run()")

    def __repr__(self) -> str:
        settings = "".join(f":{key}={value}" for key, value in self.config.items())
        return f"<pass {self.name}{settings}>"


def coerce_option(pass_name: str, key: str, kind: type, value: Any) -> Any:
    """Convert ``value`` (text from a pipeline, or a Python value) to ``kind``."""
    def invalid() -> OptionError:
        return OptionError(
            f"pass '{pass_name}': option '{key}' expects {kind.__name__}, got {value!r}"
        )

    if isinstance(value, str) and kind is not str:
        text = value.strip().lower()
        if kind is bool:
            if text not in _TRUE_WORDS:
                raise invalid()
            return _TRUE_WORDS[text]
        try:
            return kind(text)
        except ValueError:
            raise invalid() from None
    if kind is bool:
        if not isinstance(value, (bool, np.bool_)):
            raise invalid()
        return bool(value)
    if kind is int:
        if isinstance(value, bool) or not isinstance(value, (int, np.integer)):
            raise invalid()
        return int(value)
    if kind is float:
        if isinstance(value, bool) or not isinstance(value, (int, float, np.number)):
            raise invalid()
        return float(value)
    if not isinstance(value, kind):
        raise invalid()
    return value


def check_option_range(
    pass_name: str, key: str, value: Any, bounds: tuple[float | None, float | None] | None
) -> None:
    """Raise OptionError for a NaN float or a value outside the inclusive ``bounds``."""
    if isinstance(value, float) and math.isnan(value):
        raise OptionError(f"pass '{pass_name}': option '{key}' must be a number, got nan")
    if bounds is None or isinstance(value, bool) or not isinstance(value, (int, float)):
        return
    low, high = bounds
    if (low is not None and value < low) or (high is not None and value > high):
        if high is None:
            expected = f"at least {low}"
        elif low is None:
            expected = f"at most {high}"
        else:
            expected = f"in [{low}, {high}]"
        raise OptionError(f"pass '{pass_name}': option '{key}' must be {expected}, got {value}")


# --- registry -----------------------------------------------------------------------------------

ENTRY_POINT_GROUP = "graphcomp.passes"

_REGISTRY: dict[str, type[Pass]] = {}
_BUILTINS_LOADED = False
_PLUGINS_LOADED = False
# Pass name -> distribution whose entry point provided it.
_PACKAGES: dict[str, str] = {}
# Entry point name -> why it failed to load, for the unknown-pass error.
_FAILED_PLUGINS: dict[str, str] = {}


def register_pass(cls: type[Pass]) -> type[Pass]:
    """Class decorator that adds a pass to the registry under ``cls.name``."""
    for attribute in ("name", "summary"):
        if not isinstance(getattr(cls, attribute, None), str):
            raise TypeError(f"pass class {cls.__qualname__} must set the string '{attribute}'")
    for key, kind in cls.options.items():
        if kind not in OPTION_TYPES:
            raise TypeError(f"pass '{cls.name}': option '{key}' has unsupported type {kind}")
    for key in cls.ranges:
        if cls.options.get(key) not in (int, float):
            raise TypeError(f"pass '{cls.name}': range for '{key}', which is not an int or "
                            "float option")
    unknown_defaults = set(cls.defaults) - set(cls.options)
    if unknown_defaults:
        raise TypeError(f"pass '{cls.name}': defaults for undeclared options {unknown_defaults}")
    _check_declared_properties(cls)
    existing = _REGISTRY.get(cls.name)
    if existing is not None and (existing.__module__, existing.__qualname__) != (
            cls.__module__, cls.__qualname__):
        raise ValueError(
            f"pass name '{cls.name}' is already taken by {existing.__module__}."
            f"{existing.__qualname__}"
        )
    _REGISTRY[cls.name] = cls
    return cls


def _check_declared_properties(cls: type[Pass]) -> None:
    if cls.name in PROPERTIES:
        raise TypeError(f"pass name '{cls.name}' is the name of a graph property; choose another")
    for attribute in ("requires", "establishes", "invalidates"):
        names = getattr(cls, attribute)
        if isinstance(names, str) or not isinstance(names, (tuple, list, frozenset, set)):
            raise TypeError(f"pass '{cls.name}': '{attribute}' must be a tuple of names, got "
                            f"{names!r}")
        if attribute == "requires":
            continue  # names that are not properties are pass names, checked in pipelines
        unknown = [name for name in names if name not in PROPERTIES]
        if unknown:
            raise TypeError(f"pass '{cls.name}': {attribute} unknown properties {unknown}; "
                            f"known properties: {', '.join(PROPERTIES)}")


def _load_builtin_passes() -> None:
    global _BUILTINS_LOADED
    if _BUILTINS_LOADED:
        return
    package = importlib.import_module("graphcomp.passes")
    for module in pkgutil.iter_modules(package.__path__):
        importlib.import_module(f"graphcomp.passes.{module.name}")
    _BUILTINS_LOADED = True


def _load_plugin_passes() -> None:
    """Register the passes of other packages, found through the entry-point group
    ``graphcomp.passes``. Each entry point names a Pass subclass (``package.module:Class``) or
    a module whose ``@register_pass`` classes register on import."""
    global _PLUGINS_LOADED
    if _PLUGINS_LOADED:
        return
    _PLUGINS_LOADED = True
    for entry_point in importlib.metadata.entry_points(group=ENTRY_POINT_GROUP):
        _load_entry_point(entry_point)


def _load_entry_point(entry_point: importlib.metadata.EntryPoint) -> None:
    dist = getattr(entry_point, "dist", None)
    package = dist.name if dist is not None else entry_point.value.split(":")[0].split(".")[0]
    where = f"'{entry_point.name} = {entry_point.value}' of package '{package}'"
    registered_before = dict(_REGISTRY)
    try:
        loaded = entry_point.load()
        if isinstance(loaded, type) and issubclass(loaded, Pass):
            classes = [register_pass(loaded)]
        elif isinstance(loaded, types.ModuleType):
            classes = [value for value in vars(loaded).values()
                       if isinstance(value, type) and issubclass(value, Pass)
                       and _REGISTRY.get(getattr(value, "name", None)) is value]
        else:
            classes = []
        if not classes:
            raise TypeError(f"it loads {loaded!r}, which is neither a Pass subclass nor a "
                            "module that registers one")
    # A broken plugin must not stop graphcomp: any error while importing it is reported.
    except Exception as exc:
        logger.warning("skipped the pass plugin %s (%s: %s)", where, type(exc).__name__, exc)
        _FAILED_PLUGINS[entry_point.name] = f"{where} failed to load ({type(exc).__name__}: {exc})"
        return
    for cls in classes:
        if registered_before.get(cls.name) is not cls:
            _PACKAGES[cls.name] = package


def available_passes() -> dict[str, type[Pass]]:
    """Return every registered pass by name: built-in passes, passes of other packages
    (entry-point group ``graphcomp.passes``) and passes registered in this process."""
    _load_builtin_passes()
    _load_plugin_passes()
    return dict(sorted(_REGISTRY.items()))


def pass_package(cls: type[Pass]) -> str:
    """Return the package that provides the pass: the distribution of its entry point, else
    the top-level package of its module (``graphcomp`` for the built-in passes)."""
    return _PACKAGES.get(cls.name) or cls.__module__.split(".")[0]


def get_pass(name: str) -> type[Pass]:
    """Look up a pass class; the OptionError for an unknown name suggests a close match."""
    passes = available_passes()
    if name in passes:
        return passes[name]
    if name in _FAILED_PLUGINS:
        raise OptionError(f"unknown pass '{name}': the pass plugin {_FAILED_PLUGINS[name]}; "
                          "fix or reinstall that package")
    close = difflib.get_close_matches(name, list(passes), n=1)
    hint = f" Did you mean '{close[0]}'?" if close else ""
    raise OptionError(f"unknown pass '{name}'.{hint} Known passes: {', '.join(passes)}")


def parse_pipeline(text: str) -> list[Pass]:
    """Parse pipeline text into pass instances; ``none`` gives no passes.

    Passes are separated by commas or new lines (a line may end with a comma when another line
    follows). Options follow the pass name after colons, as ``key=value`` or as a bare word
    that the pass interprets (see ``Pass.parse_word``). Empty text and empty items such as
    ``dce,,dce`` raise OptionError, so that a typo does not silently drop passes.
    """
    if text.strip().lower() == "none":
        return []
    if not text.strip():
        raise OptionError("the pipeline is empty; write 'none' to run no passes")
    passes = []
    for item in _pipeline_items(text):
        if not item:
            raise OptionError(
                f"pipeline '{text.strip()}' has an empty pass name (two commas in a row, or a "
                "comma at the start or end); remove the extra comma, or write 'none' to run "
                "no passes"
            )
        name, *parts = (part.strip() for part in item.split(":"))
        cls = get_pass(name)
        options: dict[str, Any] = {}
        for part in parts:
            if "=" in part:
                key, value = (s.strip() for s in part.split("=", 1))
                given = {key: value}
            elif part:
                given = cls.parse_word(part)
            else:
                raise OptionError(f"pass '{name}': empty option in '{item}'")
            for key in given:
                if not key:
                    raise OptionError(f"pass '{name}': option without a name in '{item}'")
                if key in options:
                    raise OptionError(f"pass '{name}': option '{key}' is given twice")
            options.update(given)
        passes.append(cls(**options))
    return passes


def _pipeline_items(text: str) -> list[str]:
    """Split pipeline text into pass items; blank lines and a comma ending a line that another
    line follows are separators, not empty items."""
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    items = []
    for number, line in enumerate(lines):
        if number < len(lines) - 1:
            line = line.removesuffix(",")
        items.extend(item.strip() for item in line.split(","))
    return items


def check_requirements(passes: Sequence[Pass], graph: Graph | None = None) -> None:
    """Raise OptionError when a pass's ``requires`` are not met before it.

    A required pass must run earlier. A required property must not be invalidated by an
    earlier pass unless a pass between establishes it again. Given the input ``graph``, it
    must also be true there unless an earlier pass establishes it.
    """
    # Per property: None while it may hold, else why it does not.
    missing_because: dict[str, str | None] = dict.fromkeys(PROPERTIES)
    if graph is not None:
        for name, violation in state_of(graph).items():
            if PROPERTIES[name].violation is not None and violation is not None:
                missing_because[name] = f"the input graph '{graph.name}' lacks it ({violation})"
    for position, current in enumerate(passes):
        for name in current.requires:
            if name in PROPERTIES and missing_because[name] is not None:
                raise OptionError(
                    f"pass '{current.name}' requires property '{name}' "
                    f"({PROPERTIES[name].description}), but {missing_because[name]}"
                )
        for name in current.invalidates:
            missing_because[name] = (
                f"pass '{current.name}' before it invalidates it and no pass between "
                f"establishes it again; run '{current.name}' later in the pipeline"
            )
        for name in current.establishes:
            missing_because[name] = None
        earlier = {p.name for p in passes[:position]}
        missing = [name for name in current.requires
                   if name not in PROPERTIES and name not in earlier]
        if missing:
            order = ",".join([*missing, current.name])
            raise OptionError(
                f"pass '{current.name}' requires {', '.join(repr(m) for m in missing)} to run "
                f"earlier in the pipeline, for example '{order}'"
            )


# --- pass manager -------------------------------------------------------------------------------


@dataclass
class PassRecord:
    """One pass run. ``max_abs_error`` is the largest ``max|after - before| / max|before|``
    over the graph outputs (the plain difference where ``before`` is all zero), or None when
    the run had no feeds to check with."""

    name: str
    options: dict[str, Any]
    seconds: float
    nodes_before: int
    nodes_after: int
    changed: bool
    details: dict[str, Any]
    max_abs_error: float | None


@dataclass
class PipelineReport:
    """The graph after all passes and a record per pass."""

    graph: Graph
    records: list[PassRecord]

    def to_dict(self) -> dict[str, Any]:
        return {
            "graph": self.graph.name,
            "nodes_before": self.records[0].nodes_before if self.records else len(self.graph),
            "nodes_after": len(self.graph),
            "seconds": sum(r.seconds for r in self.records),
            "records": [asdict(record) for record in self.records],
        }


ProgressFn = Callable[[str, int, int], None]


class PassManager:
    """Runs passes in order on a copy of a graph, checking each one.

    After each pass: the verifier when ``check_structure``, and with ``verify`` and ``feeds``
    a numerical comparison with the graph before the pass (a lossless pass whose error exceeds
    ``tolerance`` fails). ``dump_dir`` receives the text form of the graph before the first
    pass (``00-input.txt``) and after each one (``01-fold-bn.txt``...). ``progress`` is called
    as each pass starts, with its name, its 0-based position and the number of passes.
    ``calibration`` (a list of feeds dicts) reaches passes as ``PassContext.calibration``,
    and ``target`` (a named build target) and ``tuning_db`` as ``PassContext.target`` and
    ``PassContext.tuning_db``. ``work_progress`` reaches
    passes as ``PassContext.progress``.
    ``after_pass`` is called after each pass has been checked, with its record and the graph
    (which later passes go on changing: copy what must outlive the call).
    """

    def __init__(
        self,
        passes: Sequence[Pass] | str,
        *,
        verify: bool = True,
        tolerance: float = 1e-4,
        feeds: Mapping[str, np.ndarray] | None = None,
        dump_dir: Path | None = None,
        check_structure: bool = True,
        progress: ProgressFn | None = None,
        calibration: Sequence[Mapping[str, np.ndarray]] | None = None,
        work_progress: Callable[[str, int, int], None] | None = None,
        target: str | None = None,
        tuning_db: Path | None = None,
        after_pass: Callable[[PassRecord, Graph], None] | None = None,
        check_contract: bool = True,
    ):
        self.passes = parse_pipeline(passes) if isinstance(passes, str) else list(passes)
        check_requirements(self.passes)
        if not tolerance >= 0:
            raise OptionError(f"tolerance must be a number >= 0, got {tolerance}")
        self.verify = verify
        self.tolerance = float(tolerance)
        self.feeds = dict(feeds) if feeds is not None else None
        self.dump_dir = Path(dump_dir) if dump_dir is not None else None
        self.check_structure = check_structure
        self.progress = progress
        self.calibration = list(calibration) if calibration is not None else None
        self.work_progress = work_progress
        self.target = target
        self.tuning_db = tuning_db
        self.after_pass = after_pass
        self.check_contract = check_contract

    def run(self, graph: Graph) -> PipelineReport:
        """Run every pass on a copy of ``graph``; ``report.graph`` is the result."""
        graph = graph.copy()
        if self.check_structure:
            try:
                verify_graph(graph)
            except VerificationError as exc:
                raise VerificationError(f"input graph '{graph.name}' is malformed: {exc}") from exc
        if self.check_contract:
            check_requirements(self.passes, graph)
        check_numbers = self.verify and self.feeds is not None
        if check_numbers:
            executor.check_feeds(graph, self.feeds)
        ctx = PassContext(feeds=self.feeds, tolerance=self.tolerance, log=logger,
                          calibration=self.calibration, target=self.target,
                          progress=self.work_progress, tuning_db=self.tuning_db)
        reference = self._outputs(graph) if check_numbers else None
        self._dump(graph, 0, "input")

        records: list[PassRecord] = []
        for position, current in enumerate(self.passes):
            if self.progress is not None:
                self.progress(current.name, position, len(self.passes))
            already_run = [p.name for p in self.passes[:position]]
            record, reference = self._run_one(graph, position, ctx, already_run, reference)
            records.append(record)
            if self.after_pass is not None:
                self.after_pass(record, graph)
        return PipelineReport(graph, records)

    def _run_one(self, graph, position: int, ctx, already_run, reference):
        current = self.passes[position]
        nodes_before = len(graph)
        logger.info("running pass %s", current.name)
        if self.check_contract:
            fingerprint, state = Fingerprint(graph), state_of(graph)
        start = time.perf_counter()
        try:
            result = current.run(graph, ctx)
        except Exception as exc:
            raise _wrap(current, already_run, exc) from exc
        seconds = time.perf_counter() - start
        if isinstance(result, (bool, np.bool_)):
            result = PassResult(changed=bool(result))
        if not isinstance(result, PassResult) or not isinstance(result.changed, (bool, np.bool_)):
            returned = type(result.changed if isinstance(result, PassResult) else result).__name__
            raise _pass_error(current, already_run, None,
                            f"run() returned {returned}, expected a PassResult or a bool that "
                            "tells whether the graph changed")
        # Written before the checks, so that a failing pass leaves its result for inspection.
        self._dump(graph, position + 1, current.name)

        if self.check_structure:
            try:
                verify_graph(graph)
            except GraphcompError as exc:
                raise _pass_error(current, already_run, None,
                                f"left a malformed graph: {exc}") from exc
        if self.check_contract:
            _check_declarations(current, already_run, result, fingerprint, state, graph)
        error = None
        if reference is not None:
            error, reference = self._compare(graph, current, already_run, reference)

        logger.info("pass %s: %.3f s, %d -> %d nodes, %s", current.name, seconds,
                    nodes_before, len(graph), result.details)
        record = PassRecord(current.name, dict(current.config), seconds, nodes_before,
                            len(graph), bool(result.changed), dict(result.details), error)
        return record, reference

    def _compare(self, graph, current: Pass, already_run, reference):
        """Return the output error of ``graph`` against ``reference`` and the new outputs."""
        try:
            outputs = self._outputs(graph)
        except GraphcompError as exc:
            raise _pass_error(current, already_run, None,
                            f"the reference executor failed after it: {exc}") from exc
        error = output_error(reference, outputs)
        if current.lossless and not error <= self.tolerance:
            raise _pass_error(
                current, already_run, None,
                f"changed the outputs by {error:.3g} relative to their scale, above the "
                f"tolerance {self.tolerance:g} for a lossless pass; rerun with --dump-dir DIR "
                "(dump_dir= in the Python API) and diff the graph text before and after it",
            )
        return error, outputs

    def _outputs(self, graph: Graph) -> list[np.ndarray]:
        by_name = executor.run(graph, self.feeds)
        return [by_name[value.name] for value in graph.outputs]

    def _dump(self, graph: Graph, number: int, label: str) -> None:
        if self.dump_dir is not None:
            write_text_atomic(self.dump_dir / f"{number:02d}-{label}.txt", format_graph(graph))


def _check_declarations(current: Pass, already_run: list[str], result: PassResult,
                        fingerprint: Fingerprint, state: dict[str, Any], graph: Graph) -> None:
    """Raise PassError when the pass broke its declared contract on ``graph``."""
    if not result.changed and Fingerprint(graph) != fingerprint:
        raise _pass_error(current, already_run, None,
                        "returned changed=False but changed the graph; return "
                        "PassResult(changed=True) whenever the graph may have changed")
    problems = broken_properties(state, state_of(graph), tuple(current.establishes),
                                 tuple(current.invalidates))
    if problems:
        raise _pass_error(current, already_run, None, "; ".join(problems))


def _pass_error(current: Pass, already_run: list[str], node: str | None,
                cause: str) -> PassError:
    """Build the PassError for ``current``, naming the package of a plugin pass."""
    return PassError(current.name, already_run, node, cause,
                     package=_PACKAGES.get(current.name))


def _wrap(current: Pass, already_run: list[str], exc: Exception) -> PassError:
    node = getattr(exc, "node", None)
    node_name = getattr(node, "name", node)
    if isinstance(exc, PassError):
        cause = str(exc)
    else:
        cause = f"{type(exc).__name__}: {exc}"
    return _pass_error(current, already_run, node_name, cause)


def output_error(before: list[np.ndarray], after: list[np.ndarray]) -> float:
    """Return the largest ``max|after - before| / max|before|`` over matching outputs; the
    plain difference where ``before`` is all zero, infinity on a shape change or a new NaN."""
    if len(before) != len(after):
        return float("inf")
    worst = 0.0
    for old, new in zip(before, after):
        if old.shape != new.shape:
            return float("inf")
        old64 = old.astype(np.float64)
        new64 = new.astype(np.float64)
        same = (old64 == new64) | (np.isnan(old64) & np.isnan(new64))
        with np.errstate(invalid="ignore"):
            diff = np.where(same, 0.0, np.abs(new64 - old64))
        if diff.size == 0:
            continue
        largest_diff = float(np.max(diff))
        if np.isnan(largest_diff):
            return float("inf")
        finite = old64[np.isfinite(old64)]
        scale = float(np.max(np.abs(finite))) if finite.size else 0.0
        worst = max(worst, largest_diff / scale if scale > 0 else largest_diff)
    return worst
