"""Public value types: action and session states, action status, model aliases."""

from __future__ import annotations

from dataclasses import dataclass
from enum import Enum
from typing import Callable, Optional

from openjd.model import v2023_09

__all__ = (
    "ActionState",
    "ActionStatus",
    "EnvironmentIdentifier",
    "EnvironmentModel",
    "EnvironmentScriptModel",
    "SessionCallbackType",
    "SessionState",
    "StepScriptModel",
)

EnvironmentIdentifier = str
EnvironmentModel = v2023_09.Environment
EnvironmentScriptModel = v2023_09.EnvironmentScript
StepScriptModel = v2023_09.StepScript


class ActionState(str, Enum):
    """State of the current or most recent action of a session."""

    RUNNING = "running"
    """The action's process is running."""
    CANCELED = "canceled"
    """The action ended after a cancel request."""
    TIMEOUT = "timeout"
    """The action ended because it reached its runtime limit."""
    FAILED = "failed"
    """The action exited non-zero, could not start, or was canceled as failed."""
    SUCCESS = "success"
    """The action exited with code 0, or had nothing to run."""


class SessionState(str, Enum):
    """State of a session; it decides which methods may be called next."""

    READY = "ready"
    """Any action may start."""
    RUNNING = "running"
    """An action is running; only cancel_action() and cleanup() are accepted."""
    CANCELING = "canceling"
    """Defined for compatibility; a session never enters this state."""
    READY_ENDING = "ready_ending"
    """A failure, cancel or final exit happened; only environment exits may start."""
    ENDED = "ended"
    """cleanup() ran or the working directory could not be created."""


@dataclass(frozen=True)
class ActionStatus:
    """Snapshot of an action's state and of the messages it printed."""

    state: ActionState
    progress: Optional[float] = None
    """Last accepted ``openjd_progress`` value, from 0.0 to 100.0."""
    status_message: Optional[str] = None
    """Last ``openjd_status`` payload."""
    fail_message: Optional[str] = None
    """Last ``openjd_fail`` payload, or the reason the library failed the action."""
    exit_code: Optional[int] = None
    """Exit code once the process ended; negative for a POSIX signal; None if no process ran."""


SessionCallbackType = Callable[[str, ActionStatus], None]
"""``callback(session_id, status)``, invoked on each state change of an action."""
