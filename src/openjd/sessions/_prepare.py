"""Turn one action model and its symbol table into the argument vector to run.

This is the part of an action that runs before any process exists: the path-mapping rules
file, embedded files, format strings of the command and arguments, the runtime limit and
the cancel method. Every failure raises ``PrelaunchError``, whose message becomes the
action's ``fail_message``.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable, Optional

from openjd.model import FormatStringError, SymbolTable
from openjd.model.v2023_09 import Action, CancelationMethodNotifyThenTerminate, EmbeddedFileText

from ._embedded_files import materialize_embedded_files
from ._env_vars import EnvOverrides
from ._logging import SessionLogger
from ._session_user import SessionUser
from ._symbols import PATH_MAPPING_FILE_SYMBOL, uses_path_mapping_file

__all__ = ("ActionInput", "PrelaunchError", "PreparedAction", "prepare_action")

@dataclass
class ActionInput:
    """Everything the runner needs to run one action.

    ``action`` is a template action resolved against ``symtab``; ``argv`` is used instead
    for ``run_subprocess``, whose command and arguments are literal.
    """

    kind: str  # "enter", "exit", "task" or "subprocess"
    env: EnvOverrides
    action: Optional[Action] = None
    argv: Optional[list[str]] = None
    symtab: SymbolTable = field(default_factory=SymbolTable)
    embedded_files: Sequence[EmbeddedFileText] = ()
    files_prefix: str = "Task.File"
    default_timeout: Optional[int] = None
    default_notify_period: int = 120
    timeout: Optional[int] = None
    write_path_mapping_file: Optional[Callable[[], Path]] = None

    @property
    def is_environment(self) -> bool:
        return self.kind in ("enter", "exit")


class PrelaunchError(Exception):
    """The action cannot start; the message is reported as its fail_message."""


@dataclass(frozen=True)
class PreparedAction:
    """A resolved action: what to run, its runtime limit, and its notify period if any."""

    argv: list[str]
    timeout: Optional[int]
    notify_period: Optional[float]  # None for the TERMINATE cancel method


def prepare_action(
    request: ActionInput,
    *,
    files_directory: Path,
    user: Optional[SessionUser],
    logger: SessionLogger,
) -> PreparedAction:
    """Write the files the action needs and resolve what it runs.

    Raises:
        PrelaunchError: a file cannot be written or a format string cannot be resolved.
    """
    if request.argv is not None:
        return PreparedAction(list(request.argv), request.timeout or request.default_timeout, None)
    action = request.action
    assert action is not None
    symtab = _add_path_mapping_file(request, action)

    if request.embedded_files:
        try:
            symtab = materialize_embedded_files(
                request.embedded_files,
                files_directory=files_directory,
                symtab=symtab,
                prefix=request.files_prefix,
                target="Environment" if request.is_environment else "Task",
                user=user,
                logger=logger,
            )
        except RuntimeError as err:
            raise PrelaunchError(str(err)) from err

    try:
        argv = [action.command.resolve(symtab=symtab)]
        argv.extend(arg.resolve(symtab=symtab) for arg in action.args or ())
    except FormatStringError as err:
        raise PrelaunchError(str(err)) from err
    timeout = _resolve_seconds(action.timeout, symtab, "timeout") or request.default_timeout
    notify_period: Optional[float] = None
    method = action.cancelation
    if isinstance(method, CancelationMethodNotifyThenTerminate):
        period = _resolve_seconds(method.notifyPeriodInSeconds, symtab, "notifyPeriodInSeconds")
        notify_period = float(period or request.default_notify_period)
    return PreparedAction(argv, timeout, notify_period)


def _add_path_mapping_file(request: ActionInput, action: Action) -> SymbolTable:
    """Write the path-mapping rules file if a format string of the action refers to it.

    Actions that do not mention the file get none: creating files costs time on every action.
    """
    texts = [str(action.command), *(str(arg) for arg in action.args or ())]
    texts.extend(str(file.data) for file in request.embedded_files)
    if request.write_path_mapping_file is None or not uses_path_mapping_file(texts):
        return request.symtab
    try:
        path = request.write_path_mapping_file()
    except OSError as err:
        raise PrelaunchError(f"Could not write the path mapping rules file: {err}") from err
    symtab = SymbolTable(source=request.symtab)
    symtab[PATH_MAPPING_FILE_SYMBOL] = str(path)
    return symtab


def _resolve_seconds(value: object, symtab: SymbolTable, field_name: str) -> Optional[int]:
    if value is None or isinstance(value, int):
        return value
    try:
        text = value.resolve(symtab=symtab)  # type: ignore[attr-defined]
        seconds = int(text)
    except FormatStringError as err:
        raise PrelaunchError(f"Could not resolve {field_name}: {err}") from err
    except ValueError as err:
        raise PrelaunchError(f"Invalid {field_name} {text!r}: it must resolve to a whole number of seconds.") from err
    if seconds <= 0:
        raise PrelaunchError(f"Invalid {field_name} {seconds}: it must be a positive number of seconds.")
    return seconds
