"""Route TVM's native log lines, which its C++ code writes straight to file descriptor 2, to
Python's log.

TVM's C++ ``LOG(WARNING)`` lines, such as MetaSchedule's "Unknown schedule rule
meta_schedule.pool_max" for every pooling kernel, bypass Python's ``sys.stderr`` and land on
the user's terminal, where they read like graphcomp errors. While ``native_log_to_logger`` is
active, file descriptor 2 is a pipe read by a thread. The thread keeps TVM's lines
(``[HH:MM:SS] path/file.cc:LINE: text`` and the indented lines that continue them) and passes
every other byte to the real stderr unchanged, so progress bars and Python warnings still show.
When the block ends, the kept lines go to the log at INFO level (the CLI's ``-v``). They are
not logged at once because a log handler that writes to stderr would write into the pipe
that the thread itself must drain.
"""

from __future__ import annotations

import contextlib
import logging
import os
import re
import sys
import threading
from typing import Iterator

logger = logging.getLogger(__name__)

# "[00:30:28] /project/src/s_tir/meta_schedule/schedule_rule/apply_custom_rule.cc:64: Warning:"
_NATIVE_LINE = re.compile(rb"\[\d{2}:\d{2}:\d{2}\] \S+\.(?:cc|cpp|c|h):\d+: ")
# Seconds to wait for the reader thread once the pipe is closed. A child process that still has
# the pipe's write end open would otherwise keep it reading forever.
_JOIN_SECONDS = 5.0


@contextlib.contextmanager
def native_log_to_logger() -> Iterator[None]:
    """Log TVM's native log lines written inside the block when it ends; leave other output
    on stderr. Does nothing where file descriptor 2 cannot be duplicated."""
    try:
        terminal = os.dup(2)
    except OSError:
        yield
        return
    read_end, write_end = os.pipe()
    native_lines: list[str] = []
    reader = threading.Thread(target=_filter, args=(read_end, terminal, native_lines),
                              daemon=True, name="graphcomp-native-log")
    reader.start()
    _flush_python_stderr()
    os.dup2(write_end, 2)
    os.close(write_end)
    try:
        yield
    finally:
        _flush_python_stderr()
        # Restoring descriptor 2 closes this process's last write end of the pipe, so the
        # reader sees the end of the stream once child processes have exited.
        os.dup2(terminal, 2)
        reader.join(_JOIN_SECONDS)
        for line in list(native_lines):
            logger.info("TVM: %s", line)
        if reader.is_alive():
            logger.info("a child process still has TVM's log pipe open; its later output is "
                        "not shown")
        else:
            os.close(read_end)
            os.close(terminal)


def _flush_python_stderr() -> None:
    with contextlib.suppress(OSError, ValueError, AttributeError):
        sys.stderr.flush()


def _filter(read_end: int, terminal: int, native_lines: list[str]) -> None:
    """Read the pipe until its end: keep TVM's lines in ``native_lines``, copy the rest to
    ``terminal``."""
    pending = b""
    in_native_message = False
    while True:
        try:
            chunk = os.read(read_end, 65536)
        except OSError:
            chunk = b""
        if not chunk:
            break
        pending += chunk
        *lines, pending = pending.split(b"\n")
        for line in lines:
            in_native_message = _route(line + b"\n", in_native_message, terminal, native_lines)
        if pending and not _may_be_native(pending, in_native_message):
            # Progress bars redraw without a newline: pass partial lines on at once.
            _write(terminal, pending)
            pending = b""
            in_native_message = False
    if pending:
        _route(pending, in_native_message, terminal, native_lines)


def _route(line: bytes, in_native_message: bool, terminal: int,
           native_lines: list[str]) -> bool:
    """Keep or pass on one line; return whether the next indented line continues it."""
    if in_native_message and line[:1] in (b" ", b"\t"):
        native_lines.append(line.decode("utf-8", errors="replace").rstrip())
        return True
    # TVM's text may follow a progress bar's partial line; the bar's part is passed on.
    found = _NATIVE_LINE.search(line)
    if found is None:
        _write(terminal, line)
        return False
    _write(terminal, line[:found.start()])
    native_lines.append(line[found.start():].decode("utf-8", errors="replace").rstrip())
    return True


def _may_be_native(partial: bytes, in_native_message: bool) -> bool:
    """Return whether an unfinished line may still turn out to be TVM's, so that it waits
    for its end."""
    if in_native_message and partial[:1] in (b" ", b"\t"):
        return True
    return partial.startswith(b"[") and not partial.startswith(b"[\x1b")


def _write(terminal: int, data: bytes) -> None:
    with contextlib.suppress(OSError):
        while data:
            data = data[os.write(terminal, data):]
