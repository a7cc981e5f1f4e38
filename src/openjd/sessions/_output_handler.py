"""Apply ``openjd_*`` messages found in an action's output, then log every line.

Messages are parsed from the process output before logging, so the protocol works at any
logger level, and host records that merely look like messages have no effect.
"""

from __future__ import annotations

import sys
from typing import TYPE_CHECKING, Callable, Optional

from ._logging import LogContent, SessionLogger
from ._messages import (
    MESSAGE_FIRST_CHARS,
    Fail,
    LogLevel,
    MessageError,
    Progress,
    Redactor,
    SetEnv,
    Status,
    UnsetEnv,
    parse_line,
    redaction_candidates,
)
from ._output import DEFAULT_MAX_ENV_LINE, DEFAULT_MAX_LINE, OversizedLine

if TYPE_CHECKING:
    from ._action import ActionRunner
    from ._process import ActionProcess

__all__ = ("OutputHandler",)

# Linux rejects execve() when one "NAME=value" string reaches MAX_ARG_STRLEN (32 pages).
_MAX_VARIABLE_BYTES = 131072 if sys.platform.startswith("linux") else None


class OutputHandler:
    """Handles the output lines of one action, in order, on the action's thread."""

    def __init__(
        self,
        runner: ActionRunner,
        logger: SessionLogger,
        redactor: Redactor,
        is_environment: bool,
        redaction_enabled: bool,
        on_secret: Callable[[], None],
    ) -> None:
        self._runner = runner
        self._logger = logger
        self._redactor = redactor
        self._is_environment = is_environment
        self._redaction_enabled = redaction_enabled
        self._on_secret = on_secret
        self.process: Optional[ActionProcess] = None
        self._previous_was_piece = False  # The last line was a full piece of a longer line.

    def handle_lines(self, lines: list[str]) -> None:
        output = self._logger.output
        starts = MESSAGE_FIRST_CHARS
        redactor = self._redactor
        # Secrets are registered only by _handle_candidate, so the flag changes only there.
        redacting = redactor.active
        for line in lines:
            if redacting and (self._previous_was_piece or len(line) == DEFAULT_MAX_LINE):
                line = self._mask_cut_secrets(line)
            if line[:1] in starts:
                self._handle_candidate(line)
                redacting = redactor.active
            else:
                output(line)

    def _mask_cut_secrets(self, line: str) -> str:
        """Mask secrets cut in two where a long line was split into ``DEFAULT_MAX_LINE`` pieces."""
        continued = self._previous_was_piece
        continues = len(line) == DEFAULT_MAX_LINE
        self._previous_was_piece = continues
        return self._redactor.redact_piece_edges(line, continues=continues, continued=continued)

    def _handle_candidate(self, line: str) -> None:
        # Every line that redaction_candidates() accepts starts with "openjd_redacted_env" in
        # any case, after any amount of whitespace, so this cheap test lets all of them through.
        if line.startswith("openjd_"):
            may_hold_secret = line[7:8] in "rR"
        else:
            may_hold_secret = line.lstrip()[:19].lower() == "openjd_redacted_env"
        if may_hold_secret:
            self._register_secrets(line)
        if isinstance(line, OversizedLine):
            self._handle_oversized(line)
            return
        try:
            message = parse_line(line)
        except MessageError as err:
            self._handle_error(line, err)
            return
        if message is not None:
            error = self._apply(message)
            if error is not None:
                line = f"{line} -- ERROR: {error}"
        self._logger.output(line)

    def _register_secrets(self, line: str) -> None:
        values = redaction_candidates(line)
        if values and not self._redaction_enabled:
            self._logger.warning(
                "Received openjd_redacted_env message but REDACTED_ENV_VARS extension is not enabled",
                content=LogContent.COMMAND_OUTPUT,
            )
        if values:
            for value in values:
                self._redactor.add(value)
            self._on_secret()

    def _handle_error(self, line: str, err: MessageError) -> None:
        if err.is_env:
            if self._is_environment:
                self._runner.fail_with_cancel(str(err))
            else:
                self._warn_not_environment(err.kind)
        self._logger.output(f"{line} -- ERROR: {err}")

    def _handle_oversized(self, line: OversizedLine) -> None:
        kind = "openjd_redacted_env" if line.startswith("openjd_redacted_env") else "openjd_env"
        reason = (
            f"The {kind} message is {line.total_length} characters long, more than the limit "
            f"of {DEFAULT_MAX_ENV_LINE} characters for one message; the variable was not set. Pass "
            "large values in a file and set the variable to the file's path."
        )
        if self._is_environment:
            self._runner.fail_with_cancel(reason)
        if kind == "openjd_redacted_env":
            self._logger.output(f"{kind}: ******** -- ERROR: {reason}")
        else:
            self._logger.output(f"{line} -- ERROR: {reason}")

    def _apply(self, message: object) -> Optional[str]:
        """Apply one message; return the error text to append to its line, if any."""
        runner = self._runner
        if isinstance(message, Progress):
            runner.set_progress(message.value)
        elif isinstance(message, Status):
            runner.set_status_message(message.text)
        elif isinstance(message, Fail):
            runner.set_fail_message(message.text)
        elif isinstance(message, LogLevel):
            self._logger.level = message.level
        elif isinstance(message, SetEnv):
            return self._apply_set_env(message)
        elif isinstance(message, UnsetEnv):
            if not self._is_environment:
                self._warn_not_environment("unset_env")
            else:
                runner.emit_env(message.name, None)
        return None

    def _apply_set_env(self, message: SetEnv) -> Optional[str]:
        kind = "redacted_env" if message.redacted else "env"
        if not self._is_environment:
            self._warn_not_environment(kind)
            return None
        if message.redacted and not self._redaction_enabled:
            return None
        if "\0" in message.value:
            reason = (
                f"The value of environment variable {message.name} contains a NUL character, "
                "which the OS cannot pass to a process."
            )
            self._runner.fail_with_cancel(reason)
            return reason
        size = len(message.name.encode()) + 1 + len(message.value.encode("utf-8", "surrogateescape"))
        if _MAX_VARIABLE_BYTES is not None and size >= _MAX_VARIABLE_BYTES:
            reason = (
                f"Environment variable {message.name} is {size} bytes long as NAME=value; Linux "
                f"limits one variable to {_MAX_VARIABLE_BYTES - 1} bytes. Pass large values in a "
                "file and set the variable to the file's path."
            )
            self._runner.fail_with_cancel(reason)
            return reason
        self._runner.emit_env(message.name, message.value)
        return None

    def _warn_not_environment(self, kind: str) -> None:
        self._logger.warning(
            f"openjd_{kind} has no effect here: only an environment's onEnter or onExit action "
            "can set or unset environment variables.",
            content=LogContent.COMMAND_OUTPUT,
        )
