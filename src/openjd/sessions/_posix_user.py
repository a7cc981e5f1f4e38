"""Running actions as another POSIX user through ``sudo``.

An action of a session with a ``PosixSessionUser`` that is not this process's user runs as
``sudo -n -u USER -i SCRIPT``. ``sudo -i`` gives the action the user's login environment and
drops this process's variables, so the script exports the action's variables itself, then
changes to the working directory and execs the command. Values thus stay out of command
lines that other users can read with ``ps``. The script is readable by its owner and the
shared group only, and is deleted when the action ends.

Helper programs are taken from fixed system directories, never from ``PATH``.
"""

from __future__ import annotations

import os
import shlex
import stat
import subprocess
import tempfile
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Optional

from ._files import _chown_group
from ._session_user import PosixSessionUser, SessionUser

__all__ = (
    "SudoRefusedError",
    "helper_path",
    "kill_as_user",
    "launch_argv",
    "needs_sudo",
    "remove_as_user",
    "sudo_rule_hint",
    "write_launch_script",
)

HELPER_DIRECTORIES = ("/usr/bin", "/bin", "/usr/sbin", "/sbin")
_SUDO_TIMEOUT = 60.0


class SudoRefusedError(RuntimeError):
    """sudo did not run a command as the session's user."""


def helper_path(name: str) -> str:
    """Return the absolute path of a helper program from the fixed system directories.

    Raises:
        FileNotFoundError: the program is in none of them.
    """
    for directory in HELPER_DIRECTORIES:
        candidate = os.path.join(directory, name)
        if os.access(candidate, os.X_OK) and os.path.isfile(candidate):
            return candidate
    raise FileNotFoundError(
        f"The helper program {name!r} was not found in {', '.join(HELPER_DIRECTORIES)}. "
        f"Install it (for example the {name!r} package of your distribution)."
    )


def needs_sudo(user: Optional[SessionUser]) -> bool:
    """Tell whether actions of ``user`` must be started through sudo."""
    if user is None:
        return False
    if not isinstance(user, PosixSessionUser):
        raise ValueError("Argument 'user' must be a PosixSessionUser on posix systems.")
    return not user.is_process_user()


def sudo_rule_hint(user: PosixSessionUser) -> str:
    """Return the sudoers rule that lets this process's user run commands as ``user``."""
    import pwd

    host = pwd.getpwuid(os.geteuid()).pw_name
    return f"{host} ALL=({user.user}) NOPASSWD: ALL"


def write_launch_script(
    working_directory: Path,
    env: Mapping[str, Optional[str]],
    argv: Sequence[str],
    user: PosixSessionUser,
) -> Path:
    """Write the shell script that sets the variables and execs ``argv``; return its path.

    Every name and value is quoted for ``/bin/sh`` and written byte for byte: no line-ending
    conversion, so values with carriage returns or newlines reach the process unchanged.
    """
    lines = ["#!/bin/sh", ""]
    for name, value in env.items():
        if value is None:
            lines.append(f"unset {name}")
        else:
            lines.append(f"export {name}={shlex.quote(value)}")
    lines.append(f"cd {shlex.quote(str(working_directory))}")
    lines.append(f"exec {shlex.join(argv)}")
    text = "\n".join(lines) + "\n"

    fd, name = tempfile.mkstemp(dir=working_directory, suffix=".sh")
    path = Path(name)
    try:
        with open(fd, "wb") as stream:
            stream.write(text.encode("utf-8", "surrogateescape"))
        _chown_group(path, user.group)
        os.chmod(path, stat.S_IRWXU | stat.S_IRWXG)
    except BaseException:
        path.unlink(missing_ok=True)
        raise
    return path


def launch_argv(user: PosixSessionUser, script: Path) -> list[str]:
    """Return the command that runs ``script`` as ``user`` with the user's login environment."""
    return [helper_path("sudo"), "-n", "-u", user.user, "-i", str(script)]


def _run_as_user(user: PosixSessionUser, argv: Sequence[str]) -> subprocess.CompletedProcess[str]:
    command = [helper_path("sudo"), "-n", "-u", user.user, "--", *argv]
    return subprocess.run(
        command,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        errors="replace",
        timeout=_SUDO_TIMEOUT,
        check=False,
    )


def kill_as_user(user: PosixSessionUser, pids: Sequence[int]) -> tuple[list[str], str]:
    """SIGKILL ``pids`` as ``user`` through sudo; return the command and its output.

    Processes that exited meanwhile make ``kill`` report an error for them, which is ignored.

    Raises:
        SudoRefusedError: sudo did not run the command.
    """
    argv = [helper_path("kill"), "-s", "KILL", "--", *(str(pid) for pid in pids)]
    result = _run_as_user(user, argv)
    _raise_if_refused(user, result)
    return [helper_path("sudo"), "-n", "-u", user.user, "--", *argv], result.stdout.strip()


def remove_as_user(user: PosixSessionUser, entries: Sequence[Path]) -> tuple[list[str], int, str]:
    """Delete ``entries`` recursively as ``user``; return the command, exit code and output.

    Files that the user created inside the working directory can be private to that user,
    so the host user could not delete them itself.
    """
    paths = [str(entry) for entry in entries]
    # rm cannot empty a directory that the user made read-only (chmod 500), so give the
    # user write access to its own directories first. find does not follow symbolic links.
    make_writable = [helper_path("find"), *paths, "-type", "d", "-exec", helper_path("chmod"), "u+rwx", "{}", "+"]
    _raise_if_refused(user, _run_as_user(user, make_writable))
    argv = [helper_path("rm"), "-rf", "--", *paths]
    result = _run_as_user(user, argv)
    _raise_if_refused(user, result)
    return [helper_path("sudo"), "-n", "-u", user.user, "--", *argv], result.returncode, result.stdout.strip()


def _raise_if_refused(user: PosixSessionUser, result: subprocess.CompletedProcess[str]) -> None:
    output = result.stdout.lower()
    if result.returncode != 0 and output.startswith("sudo:"):
        raise SudoRefusedError(
            f"sudo refused to run a command as user {user.user}: {result.stdout.strip()}. "
            f"Add a sudoers rule such as '{sudo_rule_hint(user)}'."
        )


class ActionLauncher:
    """Builds the command that starts an action as the session's user, and kills as it.

    Without a user, or with this process's own user, the command runs directly. Otherwise
    it runs through sudo, after a one-time check that sudo accepts the user without a
    password.
    """

    def __init__(self, user: Optional[SessionUser]) -> None:
        self.sudo_user: Optional[PosixSessionUser] = None
        if needs_sudo(user):
            assert isinstance(user, PosixSessionUser)
            self.sudo_user = user
        self._sudo_checked = False

    def check_sudo(self) -> None:
        """Check once per session that sudo runs commands as the user.

        Raises:
            SudoRefusedError: sudo needs a password, has no rule for the user, or is missing.
        """
        user = self.sudo_user
        if user is None or self._sudo_checked:
            return
        try:
            result = _run_as_user(user, [helper_path("true")])
        except (OSError, subprocess.TimeoutExpired) as err:
            raise SudoRefusedError(f"Could not run sudo to start the action as user {user.user}: {err}") from err
        if result.returncode != 0:
            raise SudoRefusedError(
                f"sudo refused to run commands as user {user.user} without a password "
                f"({result.stdout.strip() or f'exit code {result.returncode}'}). Add a sudoers rule such as "
                f"'{sudo_rule_hint(user)}', for example in a file under /etc/sudoers.d/."
            )
        self._sudo_checked = True
