"""The ``openjd.sessions`` logger, content flags, and the per-session record writer.

Every record a session writes carries two attributes that clients filter on:
``session_id`` and ``openjd_log_content`` (a ``LogContent`` flag, absent on a few records).
Records are built with ``Logger.makeRecord`` and passed to ``Logger.handle`` directly, which
skips the caller lookup of ``Logger._log``; output lines are the hot path of the library.
"""

from __future__ import annotations

import logging
import threading
from enum import Flag, auto
from typing import Callable, Optional

__all__ = ("LOG", "LogContent", "SessionLogger", "register_redactor", "unregister_redactor")

LOG = logging.getLogger("openjd.sessions")
LOG.setLevel(logging.INFO)

_SECTION_LINE = "=" * 46
_SUBSECTION_LINE = "-" * 46
_REDACTED_MARK = "_openjd_redacted"


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
        # makeRecord() only reads the extra mapping, so one dict per content flag serves every record.
        self._extras: dict[Optional[LogContent], dict[str, object]] = {}

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
        record = LOG.makeRecord(LOG.name, level, "(openjd.sessions)", 0, msg, args, None, None, extra, None)
        if exc_info:
            import sys

            record.exc_info = sys.exc_info()
        self._handle(record)

    def output(self, line: str) -> None:
        """Log one line of process output at INFO with ``COMMAND_OUTPUT``."""
        if not self.is_enabled_for(logging.INFO):
            return
        if self.redact is not None:
            line = self.redact(line)
        record = LOG.makeRecord(
            LOG.name,
            logging.INFO,
            "(openjd.sessions)",
            0,
            line,
            (),
            None,
            None,
            self._output_extra,
            None,
        )
        setattr(record, _REDACTED_MARK, True)
        try:
            LOG.handle(record)
        except Exception:
            _report_handler_error(record)

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
