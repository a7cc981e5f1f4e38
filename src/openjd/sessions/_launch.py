"""Start an action's command, in its cgroup when there is one, with exactly its environment.

Without a cgroup the command is spawned directly. With one (see ``_proctree``), the command
has to be inside its cgroup before it runs, so ``/bin/sh`` writes its own pid to
``cgroup.procs`` and then execs the command. The shell must pass the environment on
unchanged. ``dash``, the ``/bin/sh`` of Debian and Ubuntu, changes it at start-up: it drops
variables whose names are not shell names, such as the ``BASH_FUNC_module%%`` functions
of environment modules. It also sets ``PWD``, ``PPID`` and ``IFS``, and it exits on a
non-numeric ``OPTIND``. So there are three ways in:

- dash, and every name is a shell name other than ``OPTIND``: the shell starts without
  ``PWD``, ``PPID`` and ``IFS``, and exports the given values again (or unsets ``PWD``)
  right before the exec;
- any other shell or environment: the shell starts with an empty environment and execs
  ``/usr/bin/env -i NAME=VALUE... COMMAND``, one exec more;
- no ``/usr/bin/env``, or a command path with ``=`` in it (which env(1) would read as a
  variable): the command is spawned directly and moved into its cgroup afterwards.

The first way also works ahead of time: ``prepare_standby()`` starts a shell that joins
the next action's cgroup and waits for its script on stdin. When the next action has the
same environment and working directory, starting it only writes ``exec COMMAND`` to that
shell, so the fork, the shell's start and the cgroup move happen before the action starts.
"""

from __future__ import annotations

import errno
import fcntl
import functools
import os
import re
import resource
import shutil
import subprocess
import sys
import weakref
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Optional, Union

from ._proctree import CGROUP, STANDBY_DEPTH, ActionProcesses, SessionProcesses

__all__ = ("ProcessRequest", "prepare_standby", "start_process")

_SHELL = "/bin/sh"
_ENV_COMMAND = "/usr/bin/env"
_SHELL_NAME = re.compile(rb"[A-Za-z_][A-Za-z0-9_]*\Z")
_SET_BY_SHELL = (b"PWD", b"PPID", b"IFS")
_FATAL_TO_SHELL = b"OPTIND"
_JOIN = b'echo 0 > "$1" || exit\nshift\n'
# Linux rejects an execve() argument or variable of this many bytes or more (MAX_ARG_STRLEN).
_MAX_ARG_BYTES = 131072
# Larger requests skip the standby shell: an argument list too long for execve() then
# fails in Popen with an OSError that names E2BIG, rather than in the shell.
_STANDBY_MAX_BYTES = 256 * 1024
_F_SETPIPE_SZ = 1031  # Linux fcntl command; a larger pipe means fewer wake-ups per MiB.
_PIPE_SIZE = 1 << 20


@dataclass(frozen=True)
class ProcessRequest:
    """A process to start: argument vector, environment and working directory."""

    argv: Sequence[str]
    env: Mapping[bytes, bytes]
    cwd: Path


@dataclass(frozen=True)
class _ShellEnvironment:
    start: dict[bytes, bytes]  # The environment the shell starts with.
    restore: bytes  # Shell code that makes the exported environment equal the request's.


# The last environment that _shell_environment() looked at, and its result.
_last_shell_environment: tuple[Optional[dict[bytes, bytes]], Optional[_ShellEnvironment]] = (None, None)


def start_process(
    request: ProcessRequest, tracker: SessionProcesses
) -> tuple[subprocess.Popen[bytes], ActionProcesses]:
    """Start the request's command and track it; raise OSError if it cannot start."""
    argv = _resolve_command(request)
    started = _start_standby(request, argv, tracker)
    if started is not None:
        return started
    shell_env = _shell_environment(request.env) if tracker.mechanism == CGROUP else None
    if shell_env is None and (tracker.mechanism != CGROUP or "=" in argv[0] or not os.access(_ENV_COMMAND, os.X_OK)):
        popen = _spawn_direct(argv, request)
        return popen, tracker.track(popen.pid)
    try:
        popen = _spawn_joining(request, argv, tracker, shell_env)
    except OSError as err:
        if err.errno == errno.E2BIG and err.filename != argv[0]:
            # Popen names the shell in front of the command; the arguments are the command's.
            raise OSError(errno.E2BIG, err.strerror, argv[0]) from err
        raise
    return popen, tracker.track(popen.pid)


def _spawn_joining(
    request: ProcessRequest, argv: list[str], tracker: SessionProcesses, shell_env: Optional[_ShellEnvironment]
) -> subprocess.Popen[bytes]:
    """Spawn ``argv`` so that it joins the next action cgroup itself, or move it there after."""
    procs_file = tracker.next_procs_file()
    if procs_file is None:
        popen = _spawn_direct(argv, request)  # track() creates the cgroup and moves the process.
    elif shell_env is not None:
        code = _JOIN + shell_env.restore + b'exec "$@"'
        popen = _popen([_SHELL, "-c", code, "openjd-sessions", procs_file, *argv], request, shell_env.start)
    else:
        pairs = [name + b"=" + value for name, value in request.env.items()]
        command: list[Union[str, bytes]] = [_SHELL, "-c", _JOIN + b'exec "$@"', "openjd-sessions", procs_file]
        command += [_ENV_COMMAND, "-i"]
        popen = _popen([*command, *pairs, *argv], request, {})
    return popen


def prepare_standby(request: ProcessRequest, tracker: SessionProcesses) -> None:
    """Start a standby shell for a next action that has the environment of ``request``.

    Starts as many as needed to keep ``STANDBY_DEPTH``. Does nothing when the session has
    no cgroups, or the environment needs a way in other than the first (see the module
    documentation).
    """
    if tracker.mechanism != CGROUP:
        return
    shell_env = _shell_environment(request.env)
    if shell_env is None or any(len(name) + len(value) >= _MAX_ARG_BYTES for name, value in request.env.items()):
        return
    while tracker.standby_count() < STANDBY_DEPTH:
        reserved = tracker.reserve_cgroup()
        if reserved is None:
            return
        try:
            try:
                standby = _StandbyShell(request, shell_env, reserved[0], reserved[1], tracker)
            except (OSError, ValueError):
                tracker.return_cgroup(reserved[0])
                return
            if not tracker.put_standby(standby):
                standby.discard()
                return
        finally:
            tracker.settle_reservation()


class _StandbyShell:
    """A shell in the next action's cgroup, waiting to read the action's script on stdin."""

    def __init__(
        self,
        request: ProcessRequest,
        shell_env: _ShellEnvironment,
        cgroup: str,
        recycled: bool,
        tracker: SessionProcesses,
    ) -> None:
        self.env = dict(request.env)
        self.cwd = request.cwd
        self.cgroup = cgroup
        self.recycled = recycled
        self._restore = shell_env.restore
        self._env_bytes = sum(map(len, self.env)) + sum(map(len, self.env.values())) + 2 * len(self.env)
        # A weak reference, because the session's finalizer keeps its standby shells until it runs.
        self._tracker = weakref.ref(tracker)
        self._state = _inherited_state(request.cwd)

        # The shell reads /dev/stdin as a script through a new descriptor, so the script can
        # point stdin at /dev/null before the exec.
        argv: list[Union[str, bytes]] = [_SHELL, "-c", _JOIN + b". /dev/stdin", "openjd-sessions"]
        argv.append(os.path.join(cgroup, "cgroup.procs"))
        script_read, self._script_write = os.pipe()
        try:
            self.popen = _popen(argv, request, shell_env.start, stdin=script_read)
        except BaseException:
            os.close(self._script_write)
            raise
        finally:
            os.close(script_read)
        _live_standby_shells.add(self)

    def matches(self, request: ProcessRequest) -> bool:
        """Tell whether the shell can run ``request`` as a newly spawned process would."""
        return (
            request.cwd == self.cwd
            and request.env == self.env
            and _inherited_state(self.cwd) == self._state
            and self.popen.poll() is None
        )

    def run(self, argv: Sequence[str]) -> bool:
        """Send the script that execs ``argv``; return False if the shell cannot take it."""
        words = [os.fsencode(word) for word in argv]
        if max(map(len, words)) >= _MAX_ARG_BYTES:
            return False
        script = b"".join((b"exec 0<>/dev/null\n", self._restore, b"exec ", b" ".join(map(_quote, words)), b"\n"))
        if len(script) + self._env_bytes > _STANDBY_MAX_BYTES:
            return False
        view = memoryview(script)
        try:
            while view:
                view = view[os.write(self._script_write, view) :]
        except OSError:
            return False  # The shell exited because its cgroup join failed or it was killed.
        finally:
            os.close(self._script_write)
            self._script_write = -1
        return True

    def close_in_forked_child(self) -> None:
        """Close the script pipe in a forked child, so that the shell still reads EOF when this process ends."""
        if self._script_write >= 0:
            os.close(self._script_write)
            self._script_write = -1

    def discard(self) -> None:
        if self._script_write >= 0:
            os.close(self._script_write)  # At the end of its script the shell exits by itself.
            self._script_write = -1
        try:
            self.popen.kill()
        except OSError:
            pass
        self.popen.wait()
        if self.popen.stdout is not None:
            self.popen.stdout.close()
        tracker = self._tracker()
        if tracker is not None:
            tracker.return_cgroup(self.cgroup)  # Otherwise the session's finalizer removes it.


def _start_standby(
    request: ProcessRequest, argv: Sequence[str], tracker: SessionProcesses
) -> Optional[tuple[subprocess.Popen[bytes], ActionProcesses]]:
    standby = tracker.take_standby()
    if standby is None:
        return None
    assert isinstance(standby, _StandbyShell)
    if not (standby.matches(request) and standby.run(argv)):
        standby.discard()
        tracker.discard_standby()  # The others were started for the same environment.
        return None
    try:
        return standby.popen, tracker.track_joined(standby.popen.pid, standby.cgroup, standby.recycled)
    except RuntimeError:
        standby.discard()
        raise


def _inherited_state(cwd: Path) -> Optional[tuple[object, ...]]:
    """Return what a child inherits from this process besides its environment, or None.

    A standby shell started earlier has the umask, resource limits, nice value, CPU
    affinity and credentials of that moment, and a working directory that may since have
    been removed and created again. Compared when the shell is used, a change makes the
    action start afresh. None, when something cannot be read, never matches.
    """
    try:
        with open("/proc/self/status", "rb") as status:
            umask = next((line for line in status if line.startswith(b"Umask:")), None)
        directory = os.stat(cwd)
        limits = tuple(resource.getrlimit(limit) for limit in _RLIMITS)
        return (
            umask,
            limits,
            os.getpriority(os.PRIO_PROCESS, 0),
            frozenset(os.sched_getaffinity(0)),
            os.getresuid(),
            os.getresgid(),
            tuple(os.getgroups()),
            directory.st_dev,
            directory.st_ino,
        )
    except (OSError, AttributeError):
        return None


def _close_standby_pipes_in_child() -> None:
    for shell in list(_live_standby_shells):
        shell.close_in_forked_child()


_live_standby_shells: weakref.WeakSet[_StandbyShell] = weakref.WeakSet()
_RLIMITS = tuple(getattr(resource, name) for name in dir(resource) if name.startswith("RLIMIT_"))
os.register_at_fork(after_in_child=_close_standby_pipes_in_child)


def _shell_environment(env: Mapping[bytes, bytes]) -> Optional[_ShellEnvironment]:
    """Return how dash can pass ``env`` on unchanged, or None if it cannot."""
    global _last_shell_environment
    last_env, last_result = _last_shell_environment
    if env == last_env:
        return last_result  # Most actions of a session have the environment of the one before.
    result = _new_shell_environment(env)
    _last_shell_environment = (dict(env), result)
    return result


def _new_shell_environment(env: Mapping[bytes, bytes]) -> Optional[_ShellEnvironment]:
    if not _shell_is_dash():
        return None
    match = _SHELL_NAME.match
    for name in env:
        if name == _FATAL_TO_SHELL or match(name) is None:
            return None
    start = dict(env)
    restore = []
    for name in _SET_BY_SHELL:
        value = start.pop(name, None)
        if value is not None:
            restore.append(b"export " + name + b"=" + _quote(value) + b"\n")
    if b"PWD" not in env:
        restore.append(b"unset PWD\n")
    return _ShellEnvironment(start, b"".join(restore))


@functools.lru_cache(maxsize=1)
def _shell_is_dash() -> bool:
    return os.path.basename(os.path.realpath(_SHELL)).startswith("dash")


def _quote(value: bytes) -> bytes:
    return b"'" + value.replace(b"'", b"'\\''") + b"'"


def _resolve_command(request: ProcessRequest) -> list[str]:
    """Return ``request.argv`` with the command as a path; raise OSError if it cannot run.

    Resolving here makes a missing command an OSError with a clear message on every way
    in; a shell in between would only print "not found".
    """
    argv = list(request.argv)
    if "/" in argv[0]:
        command = os.path.join(request.cwd, argv[0])
        if not os.path.isfile(command):
            raise FileNotFoundError(errno.ENOENT, "No such file", argv[0])
        if not os.access(command, os.X_OK):
            raise PermissionError(errno.EACCES, "The file is not executable", argv[0])
        return argv
    # Relative entries of PATH, and empty ones, name directories below the action's
    # working directory, where execvp() in the new process would look.
    entries = os.fsdecode(request.env.get(b"PATH", os.fsencode(os.defpath))).split(os.pathsep)
    search_path = os.pathsep.join(os.path.join(request.cwd, entry) for entry in entries)
    found = shutil.which(argv[0], path=search_path)
    if found is None:
        raise FileNotFoundError(errno.ENOENT, "No such file or directory in PATH", argv[0])
    argv[0] = found
    return argv


def _spawn_direct(argv: list[str], request: ProcessRequest) -> subprocess.Popen[bytes]:
    try:
        return _popen(argv, request, request.env)
    except OSError as err:
        if err.errno != errno.ENOEXEC:
            raise
    # A runnable file without a "#!" line: run it with the shell, as execvp(3) and sh do.
    return _popen([_SHELL, *argv], request, request.env)


def _popen(
    argv: Sequence[Union[str, bytes]],
    request: ProcessRequest,
    env: Mapping[bytes, bytes],
    stdin: int = subprocess.DEVNULL,
) -> subprocess.Popen[bytes]:
    popen = subprocess.Popen(
        argv,
        stdin=stdin,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        cwd=str(request.cwd),
        env=env,
        start_new_session=True,
    )
    assert popen.stdout is not None
    _enlarge_pipe(popen.stdout.fileno())
    return popen


def _enlarge_pipe(fd: int) -> None:
    if sys.platform.startswith("linux"):
        try:
            fcntl.fcntl(fd, _F_SETPIPE_SZ, _PIPE_SIZE)
        except OSError:
            pass  # Above /proc/sys/fs/pipe-max-size: the default size still works.
