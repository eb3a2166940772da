"""Logging that says what happened: stages, progress and results on the console, details in a file.

One rich handler on the package logger writes to the console. Everything else a run produces
goes to the *log file*: the package's own records and Ray's (its Python loggers, and the warnings
its node pushes to the driver, such as worker-pool and object-store notes). The file is the run
folder's ``logs/creditgraph.log`` when a command works on a run (:func:`set_log_file`), else
``creditgraph-driver.log`` in the Ray session's log folder; records logged before either is known
are kept in memory and written once it is. Only Ray's errors still reach the console.

Ray's C++ core also writes its warnings and errors straight to the process's standard error
(file descriptor 2), out of reach of Python's logging: in a console session
(``CREDITGRAPH_CONSOLE_FILTER=1``, set by the ``creditgraph`` command and ``./run``) those lines
are taken off descriptor 2 into the log file by :func:`filter_native_stderr`; everything else
written there (Python's own output, progress bars) passes through unchanged.
"""

from __future__ import annotations

import atexit
import logging
import os
import re
import select
import sys
import threading
from pathlib import Path

_CONFIGURED = False
LOG_FILE_NAME = "creditgraph.log"
SESSION_LOG_NAME = "creditgraph-driver.log"
#: Ray's Python loggers whose records go to the log file (and only their errors to the console).
RAY_LOGGERS = ("ray", "ray.data", "ray.train", "ray.tune", "ray.serve", "ray.air")
FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
_BUFFER_MAX = 5000
# what Ray's node pushes to every driver that is noise for a local run: a note on many worker
# processes (expected with Ray Data and Ray Train on a few cores), arguments kept in the object
# store, large pickled functions, a task that Ray retries by itself (Ray Serve's controller when
# the service stops); they still go to the log file
_BENIGN_PUSHED = re.compile(
    r"maximum expected startup concurrency|constructor arguments in the object store"
    r"|is very large \(\d+ MiB\)|retries remaining, so the task will be retried"
)


class _FileSink(logging.Handler):
    """Writes records to a file once it knows which; keeps (a bounded number of) them until then."""

    def __init__(self) -> None:
        super().__init__(logging.DEBUG)
        self.formatter = logging.Formatter(FORMAT)
        self.path: Path | None = None
        self._file: logging.FileHandler | None = None
        self._pending: list[logging.LogRecord] = []

    def setFormatter(self, fmt: logging.Formatter | None) -> None:
        """Kept as it is: ``ray.init`` rewrites the formatter of every handler of its logger."""

    def filter(self, record: logging.LogRecord) -> bool:
        # Ray's debug records (Ray Data logs every scheduling step) stay in Ray's own files
        return record.levelno >= logging.INFO or record.name.startswith("creditgraph")

    def open(self, path: Path) -> None:
        path = Path(path)
        if self.path == path:
            return
        path.parent.mkdir(parents=True, exist_ok=True)
        handler = logging.FileHandler(path, mode="a", encoding="utf-8", delay=True)
        handler.setFormatter(self.formatter)
        old, self._file, self.path = self._file, handler, path
        if old is not None:
            old.close()
        pending, self._pending = self._pending, []
        for record in pending:
            handler.emit(record)
        handler.flush()

    def detach(self) -> None:
        if self._file is not None:
            self._file.close()
        self._file, self.path = None, None

    def emit(self, record: logging.LogRecord) -> None:
        if self._file is not None:
            self._file.emit(record)
        elif len(self._pending) < _BUFFER_MAX:
            self._pending.append(record)

    def flush(self) -> None:
        if self._file is not None:
            self._file.flush()

    def close(self) -> None:
        if self._file is not None:
            self._file.close()
        super().close()


_SINK = _FileSink()


def get_logger(name: str) -> logging.Logger:
    """Return a logger under the ``creditgraph`` namespace, configuring the root handler once."""
    global _CONFIGURED
    if not _CONFIGURED:
        from rich.logging import RichHandler

        root = logging.getLogger("creditgraph")
        if not root.handlers:
            handler = RichHandler(show_path=False, rich_tracebacks=False, markup=False)
            handler.setFormatter(logging.Formatter("%(message)s"))
            handler.setLevel(os.environ.get("CREDITGRAPH_LOG", "INFO").upper())
            root.addHandler(handler)
        root.addHandler(_SINK)
        root.setLevel(min(logging.INFO, logging.getLevelName(_level())))
        root.propagate = False
        _CONFIGURED = True
    if not name.startswith("creditgraph"):
        name = f"creditgraph.{name}"
    return logging.getLogger(name)


def _level() -> str:
    return os.environ.get("CREDITGRAPH_LOG", "INFO").upper()


def set_log_file(path: str | Path) -> Path:
    """Write the log file at ``path`` from now on (records logged so far are written there too).

    Commands that work on a run folder call it with ``RunLayout(run).logs / "creditgraph.log"``.
    """
    get_logger("creditgraph")
    _SINK.open(Path(path))
    return Path(path)


def close_log_file() -> None:
    """Stop writing the log file (later records wait for the next :func:`set_log_file`)."""
    _SINK.detach()


def log_file() -> Path | None:
    """The log file in use (None: not decided yet)."""
    return _SINK.path


def set_ray_session_dir(session: Path | None) -> None:
    """Ray is up: without a log file of its own, the process logs into the session's log folder;
    with one, a ``ray-session`` link next to it points at Ray's own logs."""
    if session is None:
        return
    logs = Path(session) / "logs"
    if _SINK.path is None:
        _SINK.open(logs / SESSION_LOG_NAME)
    else:
        link_ray_logs(_SINK.path.parent, logs)


def link_ray_logs(folder: Path, ray_logs: Path) -> None:
    """``folder/ray-session`` -> Ray's session log folder (workers, raylet, Ray Data, Train)."""
    link = Path(folder) / "ray-session"
    try:
        if link.is_symlink() or link.exists():
            if link.is_symlink() and Path(os.readlink(link)) == ray_logs:
                return
            link.unlink()
        link.symlink_to(ray_logs, target_is_directory=True)
    except OSError:
        (Path(folder) / "ray-session.txt").write_text(f"{ray_logs}\n")


def route_ray_logs() -> None:
    """Ray's Python loggers write to the log file; their console handlers keep only errors.

    The messages Ray's node pushes to the driver (printed straight to stdout by Ray) go to the
    log file too; those that are not known noise also print one line to the console.
    """
    get_logger("creditgraph")
    for name in RAY_LOGGERS:
        logger = logging.getLogger(name)
        for handler in logger.handlers:
            if handler is not _SINK and _is_console(handler):
                handler.setLevel(max(handler.level, logging.ERROR))
        if (name == "ray" or not logger.propagate) and _SINK not in logger.handlers:
            logger.addHandler(_SINK)
    _route_pushed_messages()


def _is_console(handler: logging.Handler) -> bool:
    stream = getattr(handler, "stream", None)
    return not isinstance(handler, logging.FileHandler) and stream in (
        sys.stderr,
        sys.stdout,
        sys.__stderr__,
        sys.__stdout__,
    )


def _route_pushed_messages() -> None:
    worker = sys.modules.get("ray._private.worker")
    if worker is None or getattr(worker.print_to_stdstream, "_creditgraph", False):
        return
    logger = logging.getLogger("ray.pushed")
    console = get_logger("creditgraph.ray")

    def to_log(data: dict, ignore_prefix: bool = False) -> None:
        lines = [str(line) for line in data.get("lines", [])]
        for line in lines:
            logger.warning("(%s) %s", data.get("pid", "ray"), line)
        text = "\n".join(lines)
        if text.strip() and not _BENIGN_PUSHED.search(text):
            first = next(line for line in lines if line.strip()).strip()
            where = f" (details in {_SINK.path})" if _SINK.path else ""
            console.warning("ray: %s%s", first[:300], where)

    to_log._creditgraph = True  # type: ignore[attr-defined]
    # the driver's error listener looks the function up by name at every message
    worker.print_to_stdstream = to_log


def route_python_warnings() -> None:
    """Python warnings (suspicious but legal input, named by the code that warns) print as one
    log line each instead of a file path and a source line."""
    import warnings

    logger = get_logger("creditgraph.warnings")

    def show(message, category, filename, lineno, file=None, line=None) -> None:
        logger.warning("%s", message)

    warnings.showwarning = show


CONSOLE_FILTER_ENV = "CREDITGRAPH_CONSOLE_FILTER"
# a line of Ray's C++ log (spdlog): "[2026-01-02 03:04:05,678 E 123 456] core_worker.cc:2465: ..."
_NATIVE_LINE = re.compile(rb"^\[\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} [DIWE] \d+ \d+\] ")


class _NativeStderrFilter:
    """Descriptor 2 becomes a pipe; a thread forwards what arrives to the real standard error,
    except Ray's C++ log lines, which go to the log file (fatal ones still show)."""

    def __init__(self) -> None:
        self.original: int | None = None
        self._read: int | None = None
        self._stop = threading.Event()
        self._thread: threading.Thread | None = None
        self._logger = logging.getLogger("ray.native")
        self._logger.propagate = False  # never to a console handler: that would loop back here
        self._logger.addHandler(_SINK)

    def start(self) -> None:
        if self.original is not None:
            return
        sys.stderr.flush()
        self.original = os.dup(2)
        self._read, write = os.pipe()
        os.dup2(write, 2)
        os.close(write)
        self._thread = threading.Thread(target=self._pump, name="stderr-filter", daemon=True)
        self._thread.start()
        atexit.register(self.stop)

    def _emit(self, data: bytes) -> None:
        if data:
            os.write(self.original, data)

    def _line(self, line: bytes) -> None:
        if _NATIVE_LINE.match(line):
            self._logger.warning("%s", line.decode(errors="replace").rstrip())
        else:
            self._emit(line)

    def _pump(self) -> None:
        buf = b""
        while True:
            ready, _, _ = select.select([self._read], [], [], 0.2)
            if not ready:
                if self._stop.is_set():
                    break
                continue
            data = os.read(self._read, 65536)
            if not data:
                break
            buf += data
            *lines, buf = buf.split(b"\n")
            for line in lines:
                self._line(line + b"\n")
            # an unfinished line that is not Ray's (a progress bar redrawing itself) shows now
            if buf and not buf.startswith(b"["):
                self._emit(buf)
                buf = b""
        if buf:
            self._line(buf)

    def stop(self) -> None:
        """Give descriptor 2 back and forward what is still in the pipe."""
        if self.original is None:
            return
        ray = sys.modules.get("ray")
        if ray is not None and ray.is_initialized():
            ray.shutdown()  # Ray's own exit lines still pass the filter
        sys.stderr.flush()
        os.dup2(self.original, 2)  # child processes may keep the pipe open: stop by flag
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5)
        self.original = None


_NATIVE = _NativeStderrFilter()


def filter_native_stderr() -> None:
    """Keep Ray's C++ log lines off the console of this process (see the module docstring)."""
    get_logger("creditgraph")
    _NATIVE.start()


def console_fd() -> int:
    """The descriptor of the real standard error (for a last line before ``os._exit``)."""
    return _NATIVE.original if _NATIVE.original is not None else 2
