"""Run Open Job Description actions on this host inside a Session.

A ``Session`` owns a private working directory and runs one action at a time: entering
and exiting environments, running tasks, and ad-hoc subprocesses. Process output and
diagnostics go to the ``LOG`` logger; state changes reach the session's callback.
"""

from ._logging import LOG, LogContent
from ._path_mapping import PathFormat, PathMappingRule
from ._session import Session
from ._session_user import (
    BadCredentialsException,
    PosixSessionUser,
    SessionUser,
    WindowsSessionUser,
)
from ._types import (
    ActionState,
    ActionStatus,
    EnvironmentIdentifier,
    EnvironmentModel,
    EnvironmentScriptModel,
    SessionCallbackType,
    SessionState,
    StepScriptModel,
)
from ._version import version

__all__ = (
    "ActionState",
    "ActionStatus",
    "EnvironmentIdentifier",
    "EnvironmentModel",
    "EnvironmentScriptModel",
    "LOG",
    "LogContent",
    "PathFormat",
    "PathMappingRule",
    "PosixSessionUser",
    "Session",
    "SessionCallbackType",
    "SessionState",
    "SessionUser",
    "StepScriptModel",
    "WindowsSessionUser",
    "BadCredentialsException",
    "version",
)
