"""The ``openjd.sessions`` logger, content flags, and the per-session record writer.

Every record a session writes carries two attributes that clients filter on:
``session_id`` and ``openjd_log_content`` (a ``LogContent`` flag, absent on a few records).
Records are built with ``Logger.makeRecord`` and passed to ``Logger.handle`` directly, which
skips the caller lookup of ``Logger._log``. Output lines are the hot path of the library, so
their records are copied from a template when the standard record factory is in use (see
``_RecordTemplate``).
"""

from __future__ import annotations

import logging
import os
import sys
import threading
import time
from collections.abc import Mapping
from enum import Flag, auto
from typing import Any, Callable, Optional

__all__ = ("LOG", "LogContent", "SessionLogger", "register_redactor", "unregister_redactor")

LOG = logging.getLogger("openjd.sessions")
LOG.setLevel(logging.INFO)

_SECTION_LINE = "=" * 46
_SUBSECTION_LINE = "-" * 46
_REDACTED_MARK = "_openjd_redacted"
# The pathname of every record the library writes: no source line is looked up for them.
_PATHNAME = "(openjd.sessions)"


class LogContent(Flag):
    """Kind of content in a log record, so that consumers can filter sensitive records."""

    BANNER = auto()
    """A decorative separator or section title."""
    FILE_PATH = auto()
    """A filesystem path."""
    FILE_CONTENTS = auto()
    """Contents of a file."""
    COMMAND_OUTPUT = auto()
    """Output of a command that was run."""
    EXCEPTION_INFO = auto()
    """Text of an error or exception, which may include host details."""
    PROCESS_CONTROL = auto()
    """Starting, signalling or ending processes."""
    PARAMETER_INFO = auto()
    """Names or values of parameters or variables of the action."""
    HOST_INFO = auto()
    """Host details: versions, platform, directory security."""


RedactFunction = Callable[[str], str]

# Redaction functions by session id, applied by one filter on LOG to records that a host
# application logs with a session's id. Records the library writes itself are redacted
# before they are handled, and marked so that the filter skips them.
_redactors: dict[str, RedactFunction] = {}
_redactors_lock = threading.Lock()


class _SessionRedactionFilter(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        if not _redactors or getattr(record, _REDACTED_MARK, False):
            return True
        session_id = getattr(record, "session_id", None)
        redact = _redactors.get(session_id) if isinstance(session_id, str) else None
        if redact is None:
            return True
        try:
            text = record.getMessage()
        except (TypeError, ValueError):
            text = str(record.msg)
        record.msg = redact(text)
        record.args = ()
        return True


_redaction_filter = _SessionRedactionFilter()


def register_redactor(session_id: str, redact: RedactFunction) -> None:
    """Mask secrets in records that carry ``session_id``, including the host's own records."""
    with _redactors_lock:
        _redactors[session_id] = redact
        if _redaction_filter not in LOG.filters:
            LOG.addFilter(_redaction_filter)


def unregister_redactor(session_id: str) -> None:
    with _redactors_lock:
        _redactors.pop(session_id, None)


class SessionLogger:
    """Writes the records of one session to ``LOG``.

    ``level`` is the session's own threshold, set by an ``openjd_session_runtime_loglevel``
    message; while it is None the level of ``LOG`` decides. ``redact`` masks the session's
    secrets in every record before handlers see it.
    """

    def __init__(self, session_id: str) -> None:
        self.session_id = session_id
        self.level: Optional[int] = None
        self.redact: Optional[RedactFunction] = None
        self._output_extra = {"session_id": session_id, "openjd_log_content": LogContent.COMMAND_OUTPUT}
        # Built from the first output record that the standard library makes. The flag turns
        # False when that record has attributes that _RecordTemplate cannot fill.
        self._output_template: Optional[_RecordTemplate] = None
        self._output_template_usable = True
        # makeRecord() only reads the extra mapping, so one dict per content flag serves every record.
        self._extras: dict[Optional[LogContent], dict[str, object]] = {}
        # Templates of the other records, by level and content flag, built like the output one.
        self._templates: dict[tuple[int, Optional[LogContent]], Optional[_RecordTemplate]] = {}

    def is_enabled_for(self, level: int) -> bool:
        if self.level is None:
            return LOG.isEnabledFor(level)
        return level >= self.level and not LOG.disabled and LOG.manager.disable < level

    def log(
        self,
        level: int,
        msg: str,
        *args: object,
        content: Optional[LogContent] = None,
        exc_info: bool = False,
    ) -> None:
        """Log ``msg % args`` at ``level`` with the session's attributes."""
        if not self.is_enabled_for(level):
            return
        extra = self._extras.get(content)
        if extra is None:
            extra = {"session_id": self.session_id}
            if content is not None:
                extra["openjd_log_content"] = content
            self._extras[content] = extra
        template = self._templates.get((level, content)) if not exc_info else None
        if template is not None and _uses_stock_records():
            record = template.new_record(msg, args)
        else:
            record = LOG.makeRecord(LOG.name, level, _PATHNAME, 0, msg, args, None, None, extra, None)
            if exc_info:
                record.exc_info = sys.exc_info()
            elif not args and (level, content) not in self._templates and _uses_stock_records():
                # None marks a kind of record that cannot have a template.
                self._templates[(level, content)] = _RecordTemplate.from_record(record)
        self._handle(record)

    def output(self, line: str) -> None:
        """Log one line of process output at INFO with ``COMMAND_OUTPUT``."""
        level = self.level
        if level is None:
            if not LOG.isEnabledFor(logging.INFO):
                return
        elif not (logging.INFO >= level and not LOG.disabled and LOG.manager.disable < logging.INFO):
            return
        redact = self.redact
        if redact is not None:
            line = redact(line)

        template = self._output_template
        if template is not None and _uses_stock_records():
            record = template.new_record(line)
        else:
            record = self._make_output_record(line)
        try:
            LOG.handle(record)
        except Exception:
            _report_handler_error(record)

    def _make_output_record(self, line: str) -> logging.LogRecord:
        """Build an output record with ``LOG.makeRecord``, and the template when possible."""
        record = LOG.makeRecord(LOG.name, logging.INFO, _PATHNAME, 0, line, (), None, None, self._output_extra, None)
        setattr(record, _REDACTED_MARK, True)
        if self._output_template is None and self._output_template_usable and _uses_stock_records():
            self._output_template = _RecordTemplate.from_record(record)
            self._output_template_usable = self._output_template is not None
        return record

    def _handle(self, record: logging.LogRecord) -> None:
        if self.redact is not None:
            try:
                text = record.getMessage()
            except (TypeError, ValueError):
                text = str(record.msg)
            record.msg = self.redact(text)
            record.args = ()
        setattr(record, _REDACTED_MARK, True)
        try:
            LOG.handle(record)
        except Exception:
            _report_handler_error(record)

    def debug(self, msg: str, *args: object, content: Optional[LogContent] = None) -> None:
        self.log(logging.DEBUG, msg, *args, content=content)

    def info(self, msg: str, *args: object, content: Optional[LogContent] = None) -> None:
        self.log(logging.INFO, msg, *args, content=content)

    def warning(self, msg: str, *args: object, content: Optional[LogContent] = None) -> None:
        self.log(logging.WARNING, msg, *args, content=content)

    def error(self, msg: str, *args: object, content: Optional[LogContent] = None) -> None:
        self.log(logging.ERROR, msg, *args, content=content)

    def exception(self, msg: str, *args: object, content: Optional[LogContent] = None) -> None:
        """Log at ERROR with the traceback of the exception being handled."""
        self.log(logging.ERROR, msg, *args, content=content, exc_info=True)

    def section_banner(self, title: str) -> None:
        """Log the four records of a section banner: an empty line and three banner lines."""
        self.info("")
        self.info(_SECTION_LINE, content=LogContent.BANNER)
        self.info(f"--------- {title}", content=LogContent.BANNER)
        self.info(_SECTION_LINE, content=LogContent.BANNER)

    def subsection_banner(self, title: str) -> None:
        """Log the three records of a subsection banner."""
        self.info(_SUBSECTION_LINE, content=LogContent.BANNER)
        self.info(title, content=LogContent.BANNER)
        self.info(_SUBSECTION_LINE, content=LogContent.BANNER)


def _report_handler_error(record: logging.LogRecord) -> None:
    """Report a handler that raised instead of letting it fail the session's action.

    Handlers are expected to catch their own errors (``Handler.handleError``); one that
    does not would otherwise end the action's output thread. The standard library's
    ``handleError`` prints the traceback to stderr when ``logging.raiseExceptions`` is set.
    """
    logging.Handler().handleError(record)


# ----- output records without LogRecord.__init__ ---------------------------------------------
#
# LogRecord.__init__ spends most of its time on values that are the same for every output
# line of a session (filename and module from the pathname, the level name, the extra keys).
# A template contains the attributes of one real record. Each new record gets a copy of
# them, and the attributes that change from call to call are computed here by the rules of
# LogRecord.__init__ of the running Python version. tests/test_log_records.py compares the
# two kinds of record attribute by attribute; it passes on CPython 3.9, 3.11, 3.12 and 3.13.
# NOTE: a later Python that adds a LogRecord attribute falls back to makeRecord, but one that
# changes how an existing attribute is computed needs a matching change here.

_STOCK_MAKE_RECORD = logging.Logger.makeRecord
_STOCK_RECORD_CLASS = logging.LogRecord
# Module globals of logging that LogRecord.__init__ reads on every call, so that changes
# (for example ``logging.logThreads = False``) apply to the next record as they do there.
_LOGGING_GLOBALS: dict[str, Any] = vars(logging)
_HAS_GETPID = hasattr(os, "getpid")
# os.getpid() is a system call, which cost 0.5 us on the 2-core virtual machine where this
# was measured, a third of the whole record. So the pid is read once, and again in the
# child of every fork that runs Python's fork hooks (os.fork, multiprocessing).
# NOTE: a child of C code that calls fork() without those hooks keeps the parent's pid here.
_pid: Optional[int] = os.getpid() if _HAS_GETPID else None


def _read_pid_after_fork() -> None:
    global _pid
    _pid = os.getpid()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_read_pid_after_fork)

# Python 3.12 added taskName and logging.logAsyncioTasks.
_HAS_TASK_NAME = "logAsyncioTasks" in _LOGGING_GLOBALS

# The attributes that every record of a template gets anew; the others are copied.
_COMPUTED_FIELDS = frozenset(
    ("msg", "levelname", "created", "msecs", "relativeCreated", "thread", "threadName")
    + ("processName", "process")
    + (("taskName",) if _HAS_TASK_NAME else ())
)
_COPIED_FIELDS = frozenset(
    ("name", "args", "levelno", "pathname", "filename", "module", "exc_info", "exc_text")
    + ("stack_info", "lineno", "funcName")
)


def _uses_stock_records() -> bool:
    """Tell whether ``LOG.makeRecord`` is the standard one and builds plain ``LogRecord``s.

    When a host application installs a record factory or a ``Logger`` subclass, every output
    record goes through ``LOG.makeRecord``, so the host's code receives every record.
    """
    make_record = getattr(LOG.makeRecord, "__func__", None)
    return make_record is _STOCK_MAKE_RECORD and logging.getLogRecordFactory() is _STOCK_RECORD_CLASS


def _detect_clock() -> tuple[bool, bool]:
    """Return (nanosecond clock, whole msecs) as LogRecord.__init__ of this Python computes them.

    Python 3.13 takes ``time.time_ns()`` and keeps ``logging._startTime`` in nanoseconds.
    Earlier versions take ``time.time()``. CPython 3.9.18 keeps the fraction of ``msecs``,
    while 3.10.13, 3.11.7 and 3.12 cut it to whole milliseconds (CPython gh-89047). The
    bug-fix release of 3.10 and 3.11 that changed it is not known here, so three real
    records tell which rule applies. With the old rule a sample has a whole ``msecs`` only
    when the clock reads an exact multiple of 1/8 s, about 2 in a million readings.
    """
    if isinstance(_LOGGING_GLOBALS.get("_startTime"), int):
        return True, True
    for _ in range(3):
        sample = logging.LogRecord("", logging.INFO, "", 0, "", (), None)
        if sample.msecs != int(sample.msecs):
            return False, False
    return False, True


_NANOSECOND_CLOCK, _WHOLE_MSECS = _detect_clock()


class _RecordTemplate:
    """The attributes of one kind of record, to build copies of it for new messages."""

    def __init__(self, fields: dict[str, Any]) -> None:
        self._fields = fields
        self._level: int = fields["levelno"]

    @classmethod
    def from_record(cls, record: logging.LogRecord) -> Optional[_RecordTemplate]:
        """Make a template from a record that the standard ``makeRecord`` built.

        Return None when the record has an attribute that is neither copied nor computed
        here, other than the extra keys (strings, flags and booleans), or when the running
        Python lacks a global that the computed attributes need. A newer Python that adds
        an attribute to LogRecord then falls back to ``makeRecord``.
        """
        fields = dict(vars(record))
        extra_keys = fields.keys() - _COMPUTED_FIELDS - _COPIED_FIELDS
        if not _COMPUTED_FIELDS <= fields.keys() or not _COPIED_FIELDS <= fields.keys():
            return None
        if any(not isinstance(fields[key], (str, bool, LogContent)) for key in extra_keys):
            return None
        if fields["args"] != () or not {"_startTime", "_levelToName"} <= _LOGGING_GLOBALS.keys():
            return None
        return cls(fields)

    def new_record(self, msg: str, args: tuple[object, ...] = ()) -> logging.LogRecord:
        """Build a record for ``msg % args`` with the attributes that ``LogRecord.__init__`` sets."""
        fields = self._fields.copy()
        fields["msg"] = msg
        if args:
            # LogRecord.__init__ takes a lone mapping argument as the mapping for %(name)s.
            if len(args) == 1 and isinstance(args[0], Mapping) and args[0]:
                fields["args"] = args[0]
            else:
                fields["args"] = args
        globals_ = _LOGGING_GLOBALS
        # logging.getLevelName() looks in the same table first, so a level renamed with
        # logging.addLevelName() shows its new name here too.
        level_name = globals_["_levelToName"].get(self._level)
        fields["levelname"] = level_name if level_name is not None else logging.getLevelName(self._level)

        if _NANOSECOND_CLOCK:
            now_ns = time.time_ns()
            created = now_ns / 1e9
            msecs = (now_ns % 1_000_000_000) // 1_000_000 + 0.0
            if msecs == 999.0 and int(created) != now_ns // 1_000_000_000:
                msecs = 0.0
            fields["relativeCreated"] = (now_ns - globals_["_startTime"]) / 1e6
        else:
            created = time.time()
            if _WHOLE_MSECS:
                msecs = int((created - int(created)) * 1000) + 0.0
            else:
                msecs = (created - int(created)) * 1000
            fields["relativeCreated"] = (created - globals_["_startTime"]) * 1000
        fields["created"] = created
        fields["msecs"] = msecs

        if globals_["logThreads"]:
            fields["thread"] = threading.get_ident()
            fields["threadName"] = threading.current_thread().name
        else:
            fields["thread"] = None
            fields["threadName"] = None
        fields["processName"] = _process_name() if globals_["logMultiprocessing"] else None
        fields["process"] = _pid if globals_["logProcesses"] else None
        if _HAS_TASK_NAME:
            fields["taskName"] = _task_name() if globals_["logAsyncioTasks"] else None

        record: logging.LogRecord = object.__new__(_STOCK_RECORD_CLASS)
        record.__dict__ = fields
        return record


def _process_name() -> Optional[str]:
    name: Optional[str] = "MainProcess"
    multiprocessing = sys.modules.get("multiprocessing")
    if multiprocessing is not None:
        try:
            name = multiprocessing.current_process().name
        except Exception:  # noqa: BLE001 - LogRecord.__init__ ignores every error here too
            pass
    return name


def _task_name() -> Optional[str]:
    """Return the name of the running asyncio task, or None outside a task."""
    asyncio = sys.modules.get("asyncio")
    if not asyncio:
        return None
    try:
        # Without a running loop, asyncio.current_task() raises, and raising costs more
        # than this check.
        if asyncio._get_running_loop() is None:
            return None
        name: Optional[str] = asyncio.current_task().get_name()
        return name
    except Exception:  # noqa: BLE001 - LogRecord.__init__ ignores every error here too
        return None
