"""The tuning database: MetaSchedule tuning records kept on disk, one file per target.

A tuning database is a folder (by default ``$XDG_CACHE_HOME/graphcomp/tuning``, else
``~/.cache/graphcomp/tuning``) with one JSON-lines file per target, named after the target
(``llvm-znver3-1a2b3c4d5e6f.jsonl``: kind, CPU or GPU model, a hash of the full target JSON).
One file per target, because MetaSchedule's databases look records up by workload alone and
would hand a schedule tuned for one target to another.

Each line is one JSON object:

- the first line is the header: ``{"format": "graphcomp-tuning-db", "version": 1,
  "target": {...}, "tvm_version": ...}``;
- ``{"workload": I, "shash": ..., "name": ..., "json": [...]}`` adds workload I (a fused TIR
  function; ``json`` is MetaSchedule's ``Workload.as_json``, ``shash`` its structural hash);
- ``{"record": I, "json": [...]}`` adds one measured candidate of workload I (MetaSchedule's
  ``TuningRecord.as_json``: trace, run seconds, target, argument info); failed candidates
  have run seconds ``[1e10]``, as MetaSchedule records them;
- ``{"done": I, "trials": N}`` records that tuning workload I with a budget of N trials ended
  (the search space ran out before N distinct candidates, or ``prune`` dropped records).

The file is only appended to, a batch of records at a time, each batch flushed and synced,
so a tuning run that is killed loses at most the batch it was measuring. A last line cut off
by such a kill is skipped with a warning and cut away before the next append. ``prune``
rewrites a file through a temporary file and a rename. A lock file beside each database file
keeps two processes from appending to it or pruning it at the same time.

Records are decoded lazily: reading a file parses its JSON, and only the workloads a model
uses and the records that tuning or building needs become TVM objects.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import hashlib
import json
import logging
import math
import os
import re
import tempfile
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any, Iterator

from graphcomp.errors import GraphcompError

if TYPE_CHECKING:
    import tvm

logger = logging.getLogger(__name__)

FORMAT_NAME = "graphcomp-tuning-db"
FORMAT_VERSION = 1
FILE_SUFFIX = ".jsonl"
# MetaSchedule records a candidate that failed to build or run with this run time.
FAILED_RUN_SECONDS = 1e10


class TuningDatabaseError(GraphcompError):
    """A tuning database file is corrupt, of another format version, or locked."""


def default_folder() -> Path:
    """Return the default tuning database folder, ``$XDG_CACHE_HOME/graphcomp/tuning`` or
    ``~/.cache/graphcomp/tuning``."""
    cache = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(cache) / "graphcomp" / "tuning"


def target_key(target_json: dict[str, Any]) -> str:
    """Return the file stem for a target: kind, CPU or GPU model, and a hash of the JSON."""
    canonical = json.dumps(target_json, sort_keys=True, separators=(",", ":"))
    digest = hashlib.sha256(canonical.encode()).hexdigest()[:12]
    model = target_json.get("mcpu") or target_json.get("arch") or target_json.get("mtriple")
    parts = [str(target_json.get("kind", "target")), str(model or "generic"), digest]
    return re.sub(r"[^A-Za-z0-9_.-]", "_", "-".join(parts))


def _stringify(obj: Any) -> str:
    import tvm_ffi

    return str(tvm_ffi.get_global_func("ffi.json.Stringify")(obj, None))


def _to_tvm_json(value: Any):
    # TVM's own JSON parser gives the containers MetaSchedule's from_json functions expect.
    import tvm_ffi

    return tvm_ffi.get_global_func("ffi.json.Parse")(json.dumps(value))


@dataclass
class RecordEntry:
    """One measured candidate as stored: its line number and MetaSchedule's record JSON."""

    line: int
    json: list

    @property
    def mean_seconds(self) -> float:
        """Mean measured run time in seconds; infinity for a failed candidate."""
        run_secs = self.json[1] if len(self.json) > 1 else None
        if not run_secs:
            return math.inf
        mean = sum(float(s) for s in run_secs) / len(run_secs)
        return math.inf if mean >= FAILED_RUN_SECONDS else mean


def _record_entry(number: int, record_json: Any) -> RecordEntry:
    if not isinstance(record_json, list) or len(record_json) != 4:
        raise ValueError("a record's 'json' must be a list of 4 items")
    run_secs = record_json[1]
    if not isinstance(run_secs, list) or not all(
        isinstance(s, (int, float)) and not isinstance(s, bool) for s in run_secs
    ):
        raise ValueError("a record's run seconds must be a list of numbers")
    return RecordEntry(number, record_json)


@dataclass
class WorkloadEntry:
    """One workload of a database file, with its records in file order."""

    index: int
    shash: str
    name: str
    json: list
    line: int
    records: list[RecordEntry] = field(default_factory=list)
    done_trials: int = 0
    _workload: Any = None

    @property
    def completed_trials(self) -> int:
        """Trials that count against a budget: records, or a larger budget marked done."""
        return max(len(self.records), self.done_trials)

    def best_seconds(self) -> float:
        return min((r.mean_seconds for r in self.records), default=math.inf)

    def workload(self):
        """Return the MetaSchedule Workload (decoded on first use)."""
        if self._workload is None:
            from tvm.s_tir import meta_schedule as ms

            self._workload = ms.database.Workload.from_json(_to_tvm_json(self.json))
        return self._workload

    def valid_records(self) -> list[RecordEntry]:
        """Return the records of candidates that ran, fastest first."""
        valid = [r for r in self.records if math.isfinite(r.mean_seconds)]
        return sorted(valid, key=lambda r: r.mean_seconds)


@dataclass
class TargetSummary:
    """The workloads and target of one database file, for ``tune-db list``."""

    key: str
    path: Path
    target: dict[str, Any]
    workloads: list[WorkloadEntry]

    @property
    def records(self) -> int:
        return sum(len(w.records) for w in self.workloads)

    @property
    def tuned_workloads(self) -> int:
        return sum(1 for w in self.workloads if math.isfinite(w.best_seconds()))


class TargetDatabase:
    """The records of one target: one file of a tuning database folder.

    ``load`` reads the file if it exists; ``add_workload``, ``append_records`` and
    ``mark_done`` append to it and create it (with its header) on first write.
    """

    def __init__(self, path: Path, target_json: dict[str, Any]):
        self.path = Path(path)
        self.target_json = target_json
        self.workloads: list[WorkloadEntry] = []
        self._by_hash: dict[str, list[WorkloadEntry]] = {}
        self._line_count = 0
        self._tail_checked = False

    @classmethod
    def for_target(cls, folder: Path, target: "tvm.target.Target") -> "TargetDatabase":
        """Open (and read, if present) the file of ``target`` in ``folder``."""
        from .targets import export_json

        target_json = export_json(target)
        database = cls(Path(folder) / f"{target_key(target_json)}{FILE_SUFFIX}", target_json)
        database.load()
        return database

    # --- reading ------------------------------------------------------------------------------

    def load(self) -> None:
        """Read the file; raises TuningDatabaseError naming the file and line when corrupt."""
        if not self.path.exists():
            return
        try:
            data = self.path.read_bytes()
        except OSError as exc:
            raise TuningDatabaseError(f"{self.path}: cannot read the tuning database: {exc}")
        if not data:
            return
        lines = data.split(b"\n")
        complete = data.endswith(b"\n")
        if complete:
            lines.pop()  # the empty string after the final newline
        for number, raw in enumerate(lines, start=1):
            is_cut = number == len(lines) and not complete
            item = self._parse_line(raw, number, is_cut)
            if item is None:
                continue
            if number == 1:
                self._check_header(item)
            else:
                self._add_item(item, number)
            self._line_count = number

    def _parse_line(self, raw: bytes, number: int, is_cut: bool) -> dict[str, Any] | None:
        try:
            item = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            if is_cut:
                logger.warning(
                    "%s: skipped an incomplete last line %d (a tuning run was stopped while "
                    "writing it); it is removed on the next write", self.path, number,
                )
                return None
            raise self._corrupt(number, f"not valid JSON ({exc})") from None
        if not isinstance(item, dict):
            raise self._corrupt(number, "expected a JSON object")
        return item

    def _check_header(self, header: dict[str, Any]) -> None:
        if header.get("format") != FORMAT_NAME:
            raise TuningDatabaseError(
                f"{self.path}: not a graphcomp tuning database (format "
                f"{header.get('format')!r}, expected {FORMAT_NAME!r}); move it out of the "
                f"tuning database folder, or remove it with {self._prune_hint()}"
            )
        if header.get("version") != FORMAT_VERSION:
            raise TuningDatabaseError(
                f"{self.path}: tuning database format version {header.get('version')!r}; this "
                f"graphcomp reads version {FORMAT_VERSION}. Remove the file with "
                f"{self._prune_hint()} (its records are lost) or use another --tuning-db folder"
            )
        stored = header.get("target")
        if not isinstance(stored, dict):
            raise self._corrupt(1, "the header has no 'target' object")
        if target_key(stored) != self.path.stem:
            raise TuningDatabaseError(
                f"{self.path}: the file contains records of target {json.dumps(stored)}, whose "
                f"file name is {target_key(stored)}{FILE_SUFFIX}; it was renamed or copied. "
                f"Rename it back, or remove it with {self._prune_hint()}"
            )

    def _add_item(self, item: dict[str, Any], number: int) -> None:
        try:
            if "workload" in item:
                self._add_workload_entry(WorkloadEntry(
                    index=int(item["workload"]), shash=str(item["shash"]),
                    name=str(item.get("name", "")), json=list(item["json"]), line=number,
                ))
            elif "record" in item:
                entry = self._workload_at(int(item["record"]))
                entry.records.append(_record_entry(number, item["json"]))
            elif "done" in item:
                entry = self._workload_at(int(item["done"]))
                entry.done_trials = max(entry.done_trials, int(item["trials"]))
            else:
                raise ValueError("expected a 'workload', 'record' or 'done' key")
        except (KeyError, TypeError, ValueError) as exc:
            raise self._corrupt(number, str(exc)) from None

    def _add_workload_entry(self, entry: WorkloadEntry) -> None:
        if entry.index != len(self.workloads):
            raise ValueError(f"workload index {entry.index}, expected {len(self.workloads)}")
        self.workloads.append(entry)
        self._by_hash.setdefault(entry.shash, []).append(entry)

    def _workload_at(self, index: int) -> WorkloadEntry:
        if not 0 <= index < len(self.workloads):
            raise ValueError(f"refers to workload {index}, which no earlier line defines")
        return self.workloads[index]

    def _corrupt(self, number: int, reason: str) -> TuningDatabaseError:
        return TuningDatabaseError(
            f"{self.path}: corrupt tuning database at line {number}: {reason}. Remove the "
            f"file with {self._prune_hint()} (its records are lost) or use another "
            "--tuning-db folder"
        )

    def _prune_hint(self) -> str:
        return (
            f"'graphcomp tune-db --tuning-db {self.path.parent} prune --target "
            f"{self.path.stem} --keep 0'"
        )

    # --- looking up ---------------------------------------------------------------------------

    def match(self, mod: "tvm.IRModule") -> WorkloadEntry | None:
        """Return the entry of the workload structurally equal to ``mod``, or None."""
        import tvm_ffi

        for entry in self._by_hash.get(str(tvm_ffi.structural_hash(mod)), []):
            if tvm_ffi.structural_equal(entry.workload().mod, mod):
                return entry
        return None

    def best_records(self, entry: WorkloadEntry, count: int) -> list:
        """Return up to ``count`` of the fastest records of ``entry`` as MetaSchedule
        TuningRecords. A record whose trace no longer applies is skipped with a warning."""
        from tvm.s_tir import meta_schedule as ms

        records = []
        for stored in entry.valid_records():
            if len(records) == count:
                break
            try:
                record = ms.database.TuningRecord.from_json(
                    _to_tvm_json(stored.json), entry.workload()
                )
            except Exception as exc:  # TVM reports a failed trace replay with several types
                logger.warning(
                    "%s line %d: skipped a tuning record of '%s' that does not apply: %s",
                    self.path, stored.line, entry.name, str(exc).splitlines()[0],
                )
                continue
            records.append(record)
        return records

    # --- writing ------------------------------------------------------------------------------

    def add_workload(self, mod: "tvm.IRModule", name: str) -> WorkloadEntry:
        """Append a new workload for ``mod`` (check ``match`` first) and return its entry."""
        from tvm.s_tir import meta_schedule as ms

        workload = ms.database.Workload(mod)
        workload_json = json.loads(_stringify(workload.as_json()))
        entry = WorkloadEntry(
            index=len(self.workloads), shash=str(workload_json[0]), name=name,
            json=workload_json, line=self._line_count + 1, _workload=workload,
        )
        line = {"workload": entry.index, "shash": entry.shash, "name": name,
                "json": workload_json}
        self._append([line])
        self._add_workload_entry(entry)
        return entry

    def append_records(self, entry: WorkloadEntry, records: list) -> None:
        """Append MetaSchedule TuningRecords of ``entry`` as one flushed batch."""
        lines = []
        for record in records:
            record_json = json.loads(_stringify(record.as_json()))
            lines.append({"record": entry.index, "json": record_json})
        first = self._line_count + 1
        self._append(lines)
        entry.records.extend(
            RecordEntry(first + i, line["json"]) for i, line in enumerate(lines)
        )

    def mark_done(self, entry: WorkloadEntry, trials: int) -> None:
        """Record that tuning ``entry`` with a budget of ``trials`` ended."""
        if entry.done_trials >= trials:
            return
        self._append([{"done": entry.index, "trials": int(trials)}])
        entry.done_trials = trials

    def _append(self, items: list[dict[str, Any]]) -> None:
        if not items:
            return
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._repair_tail()
        text = "".join(json.dumps(item, separators=(",", ":")) + "\n" for item in items)
        with open(self.path, "a", encoding="utf-8") as handle:
            if self._line_count == 0:
                handle.write(json.dumps(self._header(), separators=(",", ":")) + "\n")
                self._line_count = 1
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        self._line_count += len(items)

    def _header(self) -> dict[str, Any]:
        import tvm

        return {"format": FORMAT_NAME, "version": FORMAT_VERSION, "target": self.target_json,
                "tvm_version": tvm.__version__}

    def _repair_tail(self) -> None:
        # Cut away a last line that a killed run left without its newline, so the next line
        # starts on a line of its own.
        if self._tail_checked:
            return
        self._tail_checked = True
        if not self.path.exists() or self.path.stat().st_size == 0:
            return
        with open(self.path, "rb+") as handle:
            data = handle.read()
            if data.endswith(b"\n"):
                return
            cut = data.rfind(b"\n") + 1
            tail = data[cut:]
            try:
                json.loads(tail)
                handle.write(b"\n")  # a complete last line that only lacks its newline
            except (json.JSONDecodeError, UnicodeDecodeError):
                handle.truncate(cut)
                logger.warning("%s: removed an incomplete last line", self.path)

    def summary(self) -> TargetSummary:
        return TargetSummary(self.path.stem, self.path, self.target_json, self.workloads)

    @contextlib.contextmanager
    def locked(self) -> Iterator[None]:
        """Hold this file's lock; raises TuningDatabaseError if another process holds it."""
        with _file_lock(self.path):
            yield


@contextlib.contextmanager
def _file_lock(path: Path) -> Iterator[None]:
    lock_path = path.with_name(path.name + ".lock")
    lock_path.parent.mkdir(parents=True, exist_ok=True)
    with open(lock_path, "a") as handle:
        try:
            fcntl.flock(handle.fileno(), fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno not in (errno.EAGAIN, errno.EACCES):
                raise
            raise TuningDatabaseError(
                f"{path}: another graphcomp process is tuning with this database file; wait "
                "for it to finish or choose another --tuning-db folder"
            ) from None
        try:
            yield
        finally:
            fcntl.flock(handle.fileno(), fcntl.LOCK_UN)


# --- the folder: listing and pruning -----------------------------------------------------------


class TuningDatabase:
    """A tuning database folder with one ``TargetDatabase`` file per target."""

    def __init__(self, folder: Path | None = None):
        self.folder = Path(folder) if folder is not None else default_folder()
        if self.folder.exists() and not self.folder.is_dir():
            raise TuningDatabaseError(
                f"{self.folder}: --tuning-db must be a folder, and this is a file"
            )

    def for_target(self, target: "tvm.target.Target") -> TargetDatabase:
        return TargetDatabase.for_target(self.folder, target)

    def files(self) -> list[Path]:
        if not self.folder.is_dir():
            return []
        return sorted(self.folder.glob(f"*{FILE_SUFFIX}"))

    def summaries(self) -> list[TargetSummary]:
        """Read every file; raises TuningDatabaseError on the first corrupt one."""
        return [self._read(path).summary() for path in self.files()]

    def prune(self, keep: int, key: str | None = None) -> list[tuple[Path, int, int]]:
        """Keep the ``keep`` fastest records per workload (all files, or the file of target
        ``key``); ``keep`` 0 removes the files. Returns (file, records before, after)."""
        if keep < 0:
            raise TuningDatabaseError(f"--keep must be 0 or more, got {keep}")
        paths = self.files()
        if key is not None:
            paths = [p for p in paths if p.stem == key]
            if not paths:
                known = ", ".join(p.stem for p in self.files()) or "none"
                raise TuningDatabaseError(
                    f"{self.folder}: no tuning records for target '{key}' (targets: {known})"
                )
        results = []
        for path in paths:
            with _file_lock(path):
                if keep == 0:
                    before = self._count_lines_loosely(path)
                    path.unlink()
                    results.append((path, before, 0))
                    continue
                database = self._read(path)
                before = sum(len(w.records) for w in database.workloads)
                after = _rewrite_pruned(database, keep)
                results.append((path, before, after))
        return results

    def _read(self, path: Path) -> TargetDatabase:
        header = _read_header(path)
        target_json = header.get("target") if isinstance(header, dict) else None
        database = TargetDatabase(path, target_json if isinstance(target_json, dict) else {})
        database.load()
        return database

    @staticmethod
    def _count_lines_loosely(path: Path) -> int:
        # Counts record lines of a file that may be corrupt, for the prune summary.
        count = 0
        with open(path, "rb") as handle:
            for raw in handle:
                count += raw.startswith(b'{"record"')
        return count


def _read_header(path: Path) -> Any:
    try:
        with open(path, "rb") as handle:
            first = handle.readline()
        return json.loads(first) if first.strip() else None
    except (OSError, json.JSONDecodeError, UnicodeDecodeError):
        return None  # load() reports the fault with the line number


def _rewrite_pruned(database: TargetDatabase, keep: int) -> int:
    """Rewrite ``database`` with the ``keep`` fastest records of each workload, through a
    temporary file and a rename. Each workload keeps a done marker with its trial count, so
    pruned records still count against the next run's trial budget."""
    header = database._header()  # noqa: SLF001 (same module)
    lines = [header]
    kept = 0
    for index, entry in enumerate(database.workloads):
        lines.append({"workload": index, "shash": entry.shash, "name": entry.name,
                      "json": entry.json})
        for record in entry.valid_records()[:keep]:
            lines.append({"record": index, "json": record.json})
            kept += 1
        if entry.completed_trials:
            lines.append({"done": index, "trials": entry.completed_trials})
    text = "".join(json.dumps(line, separators=(",", ":")) + "\n" for line in lines)
    fd, tmp = tempfile.mkstemp(prefix=f".{database.path.name}.", suffix=".tmp",
                               dir=database.path.parent)
    try:
        with os.fdopen(fd, "w", encoding="utf-8") as handle:
            handle.write(text)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(tmp, database.path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise
    return kept
