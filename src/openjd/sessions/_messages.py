"""The ``openjd_*`` output protocol: parse one output line into a message, mask secrets.

A running action talks to its session by printing lines such as ``openjd_progress: 50`` or
``openjd_env: NAME=value``. ``parse_line`` turns one line into a frozen dataclass, returns
None for ordinary output, and raises ``MessageError`` for a malformed message. The module
only parses. It logs nothing and stores no session state, so the session decides what a
message does. ``Redactor`` stores the secrets of one session and masks them in text.
"""

from __future__ import annotations

import json
import logging
import re
import threading
from dataclasses import dataclass
from typing import Callable, Optional, Union

__all__ = (
    "Fail",
    "LogLevel",
    "MESSAGE_FIRST_CHARS",
    "Message",
    "MessageError",
    "Progress",
    "REDACTION_MASK",
    "Redactor",
    "SetEnv",
    "Status",
    "UnsetEnv",
    "parse_line",
    "redaction_candidates",
)


@dataclass(frozen=True)
class Progress:
    """``openjd_progress``: percent complete, from 0.0 to 100.0."""

    value: float


@dataclass(frozen=True)
class Status:
    """``openjd_status``: a status text for the action."""

    text: str


@dataclass(frozen=True)
class Fail:
    """``openjd_fail``: a failure reason. It does not stop the action."""

    text: str


@dataclass(frozen=True)
class SetEnv:
    """``openjd_env`` or ``openjd_redacted_env``: set one environment variable."""

    name: str
    value: str
    redacted: bool
    raw_value: str
    """Text after the first ``=`` as printed, before JSON decoding."""


@dataclass(frozen=True)
class UnsetEnv:
    """``openjd_unset_env``: remove one environment variable."""

    name: str


@dataclass(frozen=True)
class LogLevel:
    """``openjd_session_runtime_loglevel``: the level for the session's output."""

    level: int
    name: str


Message = Union[Progress, Status, Fail, SetEnv, UnsetEnv, LogLevel]


class MessageError(ValueError):
    """A line that is an ``openjd_*`` message, or an attempt at one, and is malformed.

    ``kind`` is the message kind without the ``openjd_`` prefix (for example ``"env"``).
    ``is_env`` is True when the line tried to set or unset an environment variable.
    """

    def __init__(self, kind: str, text: str) -> None:
        super().__init__(text)
        self.kind = kind
        self.is_env = kind in _ENV_KINDS


_ENV_KINDS = frozenset(("env", "redacted_env", "unset_env"))
_NAME_PATTERN = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")
_ENV_ATTEMPT_PATTERN = re.compile(r"openjd_(env|unset_env|redacted_env)\s*:")
_JSON_DECODER = json.JSONDecoder()
_JSON_WHITESPACE = " \t\n\r"
_REDACTED_ENV_PREFIX = "openjd_redacted_env: "
_ECHO_LIMIT = 60
_LOG_LEVELS = {
    "DEBUG": logging.DEBUG,
    "INFO": logging.INFO,
    "WARNING": logging.WARNING,
    "ERROR": logging.ERROR,
}
_PROGRESS_ERROR = "Progress must be a floating point value between 0.0 and 100.0, inclusive."
_NAME_RULE = "must start with a letter or underscore and contain only letters, digits and underscores"

# The characters for which ``str.isspace()`` is True, as a test checks. A line can be a
# message, or a malformed environment message, only if it starts with one of these or "o"/"O".
_WHITESPACE = (
    "\t\n\x0b\x0c\r\x1c\x1d\x1e\x1f \x85\xa0\u1680"
    "\u2000\u2001\u2002\u2003\u2004\u2005\u2006\u2007\u2008\u2009\u200a"
    "\u2028\u2029\u202f\u205f\u3000"
)
MESSAGE_FIRST_CHARS = frozenset("oO" + _WHITESPACE)


def parse_line(line: str) -> Optional[Message]:
    """Parse one output line into a message, or return None for ordinary output.

    Raises:
        MessageError: the line is a message with an invalid payload, or it looks like an
            environment message (``openjd_env``, ``openjd_redacted_env``,
            ``openjd_unset_env``) in the wrong case, indented, or without exactly one space
            after the colon.
    """
    if line[:1] not in MESSAGE_FIRST_CHARS:
        return None

    if line.startswith("openjd_"):
        kind, separator, payload = line[7:].partition(": ")
        parse_payload = _PAYLOAD_PARSERS.get(kind)
        if separator and payload and parse_payload is not None:
            return parse_payload(payload)
    elif line.lstrip()[:7].lower() != "openjd_":
        return None

    _reject_env_attempt(line)
    return None


def _reject_env_attempt(line: str) -> None:
    match = _ENV_ATTEMPT_PATTERN.match(line.lstrip().lower())
    if match is None:
        return

    kind = match.group(1)
    example = f"openjd_{kind}: NAME" if kind == "unset_env" else f"openjd_{kind}: NAME=value"
    if line.startswith(f"openjd_{kind}:") and not line[len(kind) + 8 :].strip():
        raise MessageError(kind, f'Invalid openjd_{kind} message: nothing follows the colon. Write "{example}".')
    quoted_line = "" if kind == "redacted_env" else f" in {_echo(line)}"
    raise MessageError(
        kind,
        f"Invalid openjd_{kind} message{quoted_line}: print it at the start of the line, in lower "
        f'case, with one space after the colon, as in "{example}".',
    )


def _parse_progress(payload: str) -> Progress:
    try:
        value = float(payload)
    except ValueError:
        raise MessageError("progress", _PROGRESS_ERROR) from None
    if not 0.0 <= value <= 100.0:
        raise MessageError("progress", _PROGRESS_ERROR)
    return Progress(value)


def _parse_log_level(payload: str) -> LogLevel:
    name = payload.upper().strip()
    level = _LOG_LEVELS.get(name)
    if level is None:
        known = ",".join(_LOG_LEVELS)
        raise MessageError("session_runtime_loglevel", f"Unknown log level: {name}. Known values: {known}")
    return LogLevel(level, name)


def _parse_unset_env(payload: str) -> UnsetEnv:
    name = payload.lstrip()
    if _NAME_PATTERN.match(name) is None:
        raise MessageError(
            "unset_env",
            f"Invalid openjd_unset_env message: {_echo(name)} is not a variable name. "
            f'A name {_NAME_RULE}, as in "openjd_unset_env: NAME".',
        )
    return UnsetEnv(name)


def _parse_set_env(payload: str, kind: str) -> SetEnv:
    text = payload.lstrip()
    if text.startswith('"'):
        assignment = _decode_json_string(text, kind)
    else:
        assignment = text

    name, separator, value = assignment.partition("=")
    if not separator:
        subject = "the value" if kind == "redacted_env" else _echo(assignment)
        raise MessageError(
            kind,
            f'Invalid openjd_{kind} message: {subject} contains no "=". '
            f'Write the assignment as "openjd_{kind}: NAME=value".',
        )
    if _NAME_PATTERN.match(name) is None:
        quoted_name = "" if kind == "redacted_env" else f" {_echo(name)}"
        raise MessageError(kind, f"Invalid openjd_{kind} message: the variable name{quoted_name} {_NAME_RULE}.")

    raw_value = text.partition("=")[2]
    return SetEnv(name, value, kind == "redacted_env", raw_value)


def _decode_json_string(text: str, kind: str) -> str:
    """Decode the JSON string at the start of ``text``. Only whitespace may follow it."""
    try:
        decoded, end = _JSON_DECODER.raw_decode(text)
    except json.JSONDecodeError as error:
        if error.msg.startswith("Unterminated string"):
            problem = "the JSON string has no closing double quote"
        else:
            problem = f"the JSON string is invalid ({error.msg} at character {error.pos + 1})"
        raise MessageError(
            kind,
            f"Invalid openjd_{kind} message: {problem}. Write the assignment as one JSON "
            f'string, for example: openjd_{kind}: "NAME=value"',
        ) from None

    if text[end:].strip(_JSON_WHITESPACE):
        raise MessageError(
            kind,
            f"Invalid openjd_{kind} message: unexpected text after the closing double quote of "
            "the JSON string. Remove it, or write the assignment without quotes.",
        )
    if not isinstance(decoded, str):
        raise MessageError(kind, f"Invalid openjd_{kind} message: the value is not a JSON string.")
    return decoded


def _echo(text: str) -> str:
    """Quote ``text`` for an error message, shortened to a readable length."""
    if len(text) > _ECHO_LIMIT:
        text = text[:_ECHO_LIMIT] + "..."
    return json.dumps(text, ensure_ascii=False)


_PAYLOAD_PARSERS: dict[str, Callable[[str], Message]] = {
    "progress": _parse_progress,
    "status": Status,
    "fail": Fail,
    "env": lambda payload: _parse_set_env(payload, "env"),
    "redacted_env": lambda payload: _parse_set_env(payload, "redacted_env"),
    "unset_env": _parse_unset_env,
    "session_runtime_loglevel": _parse_log_level,
}


def redaction_candidates(line: str) -> list[str]:
    """Return the texts of an ``openjd_redacted_env`` line to register as secrets.

    Call this before ``parse_line`` so that a secret is masked even when the message is
    malformed. The texts are the value as printed (everything after the first ``=``, or the
    whole payload when there is no ``=``) and, for a JSON string, also the decoded value,
    even when unexpected text follows the string.
    Indented or wrongly cased ``openjd_redacted_env`` lines count too, so that their value is
    masked while the session reports them as malformed. Other lines return an empty list.
    """
    if line.startswith(_REDACTED_ENV_PREFIX):
        payload: Optional[str] = line[len(_REDACTED_ENV_PREFIX) :].lstrip()
    else:
        payload = _misspelled_redacted_env_payload(line)
    if payload is None:
        return []

    _, separator, raw_value = payload.partition("=")
    candidates = [raw_value] if separator else [payload]
    if payload.startswith('"'):
        # A JSON empty value leaves only the closing quote, which is no secret.
        if not raw_value.strip(_JSON_WHITESPACE + '"'):
            candidates = []
        try:
            decoded, _ = _JSON_DECODER.raw_decode(payload)
        except json.JSONDecodeError:
            decoded = ""
        decoded_value = decoded.partition("=")[2] if isinstance(decoded, str) else ""
        if decoded_value not in candidates:
            candidates.append(decoded_value)
    return [text for text in candidates if text]


def _misspelled_redacted_env_payload(line: str) -> Optional[str]:
    stripped = line.lstrip()
    if stripped[:19].lower() != "openjd_redacted_env":
        return None
    match = _ENV_ATTEMPT_PATTERN.match(stripped.lower())
    if match is None or match.group(1) != "redacted_env":
        return None
    return stripped[match.end() :].lstrip()


REDACTION_MASK = "********"


@dataclass(frozen=True)
class _Secrets:
    values: frozenset[str]
    lines: frozenset[str]
    # The values again, longest first, for the search loops. A str.find per value was 2 to
    # 7 times faster than one compiled regex alternation of all values. The measurement used
    # 2 to 128 random values of 8 to 30 characters in random lines of 100 and 64,000
    # characters (CPython 3.11 on a 2-core AMD EPYC virtual machine).
    ordered: tuple[str, ...]


_NO_SECRETS = _Secrets(frozenset(), frozenset(), ())


class Redactor:
    """The secrets of one session, and the masking of them in text.

    Two sets only grow: values, which are masked wherever they occur, and whole lines, which
    are masked only when a line equals them (the middle lines of a multi-line secret, which
    may be short or common). The sets form one immutable snapshot that ``add`` replaces, so
    ``redact`` may run on other threads without a lock.
    """

    def __init__(self) -> None:
        self._secrets = _NO_SECRETS
        self._add_lock = threading.Lock()

    @property
    def active(self) -> bool:
        """True once any secret is registered."""
        secrets = self._secrets
        return bool(secrets.values or secrets.lines)

    def add(self, value: str) -> None:
        """Register ``value`` as a secret. An empty value registers nothing.

        For a multi-line value, its first and last lines are masked wherever they occur and
        its middle lines only as whole lines. The full value is masked wherever it occurs.
        """
        if not value:
            return
        new_values = {value}
        new_lines: set[str] = set()
        if "\n" in value:
            pieces = value.split("\n")
            new_values.update(piece for piece in (pieces[0], pieces[-1]) if piece)
            new_lines.update(piece for piece in pieces[1:-1] if piece)

        with self._add_lock:
            current = self._secrets
            if new_values <= current.values and new_lines <= current.lines:
                return
            values = current.values | new_values
            lines = current.lines | new_lines
            ordered = tuple(sorted(values, key=lambda text: (-len(text), text)))
            self._secrets = _Secrets(values, lines, ordered)

    def redact_piece_edges(self, text: str, *, continues: bool, continued: bool) -> str:
        """Mask the edges of one piece of a line that was cut into pieces.

        A secret can straddle the cut between two pieces, where neither piece contains it
        whole. When ``continues`` (another piece follows), a suffix of ``text`` that is the
        start of a secret is masked; when ``continued`` (a piece came before), a prefix that
        is the end of a secret is masked. This can mask harmless text that happens to look
        like part of a secret, which is the safe side.
        """
        values = self._secrets.values
        cut_end = 0
        cut_start = len(text)
        for value in values:
            for length in range(len(value) - 1, 0, -1):
                if continues and text.endswith(value[:length]):
                    cut_start = min(cut_start, len(text) - length)
                    break
            for length in range(len(value) - 1, 0, -1):
                if continued and text.startswith(value[-length:]):
                    cut_end = max(cut_end, length)
                    break
        if cut_end == 0 and cut_start == len(text):
            return text
        head = REDACTION_MASK if cut_end else ""
        tail = REDACTION_MASK if cut_start < len(text) else ""
        return head + text[cut_end:cut_start] + tail

    def redact(self, text: str) -> str:
        """Return ``text`` with every occurrence of a secret replaced by ``********``.

        Occurrences that overlap or touch are merged and replaced by one mask. A line of
        ``text`` that equals a whole-line secret becomes ``********``.
        """
        secrets = self._secrets
        if "\n" not in text:
            if text in secrets.lines:
                return REDACTION_MASK
            # Most lines contain no secret, so test for that before building a list of spans.
            for value in secrets.ordered:
                if value in text:
                    break
            else:
                return text
            spans = _value_spans(secrets.ordered, text)
        else:
            spans = _line_spans(secrets.lines, text)
            spans.extend(_value_spans(secrets.ordered, text))
            spans.sort()
        if not spans:
            return text
        return _mask(text, spans)


def _value_spans(values: tuple[str, ...], text: str) -> list[tuple[int, int]]:
    """Return the spans of every occurrence of every value in ``text``, overlapping ones too.

    The spans are sorted by start unless there are several values.
    """
    spans = []
    find = text.find
    for value in values:
        start = find(value)
        while start >= 0:
            spans.append((start, start + len(value)))
            start = find(value, start + 1)
    if len(values) > 1:
        spans.sort()
    return spans


def _line_spans(lines: frozenset[str], text: str) -> list[tuple[int, int]]:
    spans = []
    if lines:
        start = 0
        for line in text.split("\n"):
            end = start + len(line)
            if line in lines:
                spans.append((start, end))
            start = end + 1
    return spans


def _mask(text: str, spans: list[tuple[int, int]]) -> str:
    """Replace the union of ``spans`` (sorted by start) by one mask per connected run."""
    if len(spans) == 1:
        start, end = spans[0]
        return text[:start] + REDACTION_MASK + text[end:]
    pieces = []
    kept_from = 0
    run_start, run_end = spans[0]
    for start, end in spans[1:]:
        if start <= run_end:
            run_end = max(run_end, end)
            continue
        pieces.append(text[kept_from:run_start])
        pieces.append(REDACTION_MASK)
        kept_from = run_end
        run_start, run_end = start, end
    pieces.append(text[kept_from:run_start])
    pieces.append(REDACTION_MASK)
    pieces.append(text[run_end:])
    return "".join(pieces)
