"""Environment variables of an action: name checks and the layering of sources."""

from __future__ import annotations

import re
import sys
from collections.abc import Iterable, Mapping
from typing import Optional

__all__ = ("EnvOverrides", "build_overrides", "check_os_env_vars", "invalid_variable_reason")

# None marks a variable that an environment unset; it removes the host's value too.
EnvOverrides = dict[str, Optional[str]]

_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*\Z")


def invalid_variable_reason(name: object, value: object) -> Optional[str]:
    """Return why ``name=value`` cannot be given to a process, or None if it can.

    Names follow the POSIX shell rule (letters, digits and underscores, not starting with a
    digit) so that every variable can also be exported by a shell script. Values are text
    without NUL characters, which the OS cannot store.
    """
    if not isinstance(name, str) or not _NAME.match(name):
        return (
            f"environment variable name {name!r} is invalid: use letters, digits and "
            "underscores, starting with a letter or underscore"
        )
    if not isinstance(value, str):
        return f"the value of environment variable {name} must be a str, not {type(value).__name__}"
    if "\0" in value:
        return f"the value of environment variable {name} contains a NUL character"
    return None


def check_os_env_vars(variables: Optional[Mapping[str, str]], argument: str = "os_env_vars") -> None:
    """Raise ValueError naming the first variable of ``variables`` that a process cannot hold."""
    if not variables:
        return
    for name, value in variables.items():
        reason = invalid_variable_reason(name, value)
        if reason is not None:
            raise ValueError(f"Invalid {argument}: {reason}.")


def build_overrides(
    session_vars: Mapping[str, str],
    call_vars: Optional[Mapping[str, str]],
    environment_sets: Iterable[Mapping[str, Optional[str]]],
) -> EnvOverrides:
    """Merge the variable sources of one action, lowest precedence first.

    ``session_vars`` already contains the constructor's variables and
    ``OPENJD_SESSION_WORKING_DIR``; then come the call's variables, then each entered
    environment's set in entry order.
    """
    merged: EnvOverrides = dict(session_vars)
    if call_vars:
        merged.update(call_vars)
    for variables in environment_sets:
        merged.update(variables)
    if sys.platform == "win32":
        return {name.upper(): value for name, value in merged.items()}
    return merged
