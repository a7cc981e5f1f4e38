"""Find and kill every process of an action, including descendants that left its group.

The library starts each action's main process in a new session, so the main pid is also its
process group id and its session id. Descendants can leave that group with ``setsid()`` or
``setpgid()`` and can outlive their parents. Two mechanisms find them:

``cgroup`` (Linux with a writable cgroup v2)
    Each ``SessionProcesses`` creates a cgroup ``openjd-<session id>-<random>`` below the
    cgroup of this process, and each tracked action gets a child cgroup ``action-<n>``.
    ``track()`` moves the main process and the descendants it already has into that cgroup,
    so everything the action starts later is born inside it, whatever its session or group.
    A kill writes ``cgroup.kill`` (Linux 5.14 and later) or freezes the cgroup and signals
    every member. The cgroup of this process must be writable: as root, or in a subtree
    that systemd delegated to this user.
``process-group`` (every other case, and always on macOS)
    A kill sends SIGKILL to the main pid's process group, to every process whose process
    group or session id is the main pid, and to every live descendant of those processes.
    It scans again until a scan finds no process it has not signalled yet, which catches
    processes forked during the kill. It misses a process outside the main pid's session
    whose parent exited before the kill: a ``setsid()`` grandchild of an exited child, or
    a double-forked daemon.

The environment variable ``OPENJD_SESSIONS_PROCESS_TRACKING`` selects the mechanism:
``auto`` (the default, also when unset or empty) uses ``cgroup`` where possible;
``cgroup`` makes ``SessionProcesses()`` raise RuntimeError when no writable cgroup v2 is
available; ``process-group`` never creates cgroups. The ``mechanism`` argument of
``SessionProcesses`` overrides the variable. Nothing here logs: the callers log.
"""

from __future__ import annotations

import errno
import functools
import os
import sys
import threading
import time
import weakref
from typing import Callable, Optional

from ._proctree_cgroup import (
    VANISHED_ERRNOS,
    create_session_cgroup,
    kill_cgroup,
    move_into_cgroup,
    read_cgroup_pids,
    read_cpu_usage,
    remove_cgroup_dir,
    wait_for_event,
)
from ._proctree_scan import (
    ActionRoot,
    kill_by_scan,
    read_proc_stat,
    scan_processes,
    select_action_processes,
    wait_for_any_exit,
)

__all__ = (
    "CGROUP",
    "PROCESS_GROUP",
    "TRACKING_ENV_VAR",
    "ActionProcesses",
    "KillPermissionError",
    "SessionProcesses",
)

TRACKING_ENV_VAR = "OPENJD_SESSIONS_PROCESS_TRACKING"
CGROUP = "cgroup"
PROCESS_GROUP = "process-group"

# How long release() waits for killed processes to leave the cgroup before giving up on
# removing it; close() tries again.
_KILLED_EXIT_TIMEOUT = 2.0


class KillPermissionError(PermissionError):
    """SIGKILL was refused for some processes because they belong to another user."""

    def __init__(self, denied: list[int], signalled: list[int]) -> None:
        super().__init__(
            errno.EPERM,
            f"SIGKILL was not permitted for process(es) {denied}, which belong to another"
            " user; kill them as that user, for example through sudo",
        )
        self.denied = denied
        self.signalled = signalled


class ActionProcesses:
    """The processes of one action, from its main process down.

    Created by ``SessionProcesses.track()``. ``kill()`` may run on another thread while the
    action's thread calls ``members()`` or ``release()``: the cgroup is removed only when
    empty, and every file operation treats a removed cgroup as empty.
    """

    def __init__(
        self,
        main_pid: int,
        cgroup: Optional[str],
        use_kill_file: bool,
        on_removed: Callable[[], None],
    ) -> None:
        self.main_pid = main_pid
        self.mechanism = PROCESS_GROUP
        self.cgroup_path: Optional[str] = None
        # Why the move into the cgroup failed, for the caller to log; None when the move
        # worked, was not tried, or failed only because the process had already exited.
        self.tracking_error: Optional[OSError] = None
        self._use_kill_file = use_kill_file
        self._on_removed = on_removed
        self._lock = threading.Lock()
        self._killed = False
        self._removed = False
        self._final_cpu_usage: Optional[float] = None
        self._root = ActionRoot(main_pid, None)

        if cgroup is not None:
            try:
                move_into_cgroup(cgroup, main_pid)
            except OSError as err:
                remove_cgroup_dir(cgroup)
                if err.errno not in VANISHED_ERRNOS:
                    self.tracking_error = err
            else:
                self.mechanism = CGROUP
                self.cgroup_path = cgroup
                return
        if sys.platform.startswith("linux"):
            proc = read_proc_stat(main_pid)
            self._root = ActionRoot(main_pid, proc.start_time if proc else None)

    def __repr__(self) -> str:
        return f"<ActionProcesses main_pid={self.main_pid} mechanism={self.mechanism}>"

    @property
    def _live_cgroup(self) -> Optional[str]:
        return None if self._removed else self.cgroup_path

    def kill(self) -> list[int]:
        """SIGKILL every process of this action and return the pids signalled.

        With ``cgroup.kill`` these are the pids listed in ``cgroup.procs`` just before.
        Processes that already exited are skipped silently. Does not wait for the
        processes to exit; ``wait_empty()`` does.

        Raises:
            KillPermissionError: some processes belong to another user; all others were
                signalled.
        """
        with self._lock:
            self._killed = True
            cgroup = self._live_cgroup
        if self.mechanism == CGROUP:
            return [] if cgroup is None else kill_cgroup(cgroup, self._use_kill_file)

        signalled, denied = kill_by_scan([self._root])
        if denied:
            raise KillPermissionError(denied, signalled)
        return signalled

    def members(self) -> list[int]:
        """Return the pids of this action's live processes, sorted."""
        if self.mechanism == CGROUP:
            cgroup = self._live_cgroup
            return [] if cgroup is None else sorted(read_cgroup_pids(cgroup))
        return sorted(select_action_processes(scan_processes(), [self._root]))

    def wait_empty(self, timeout: float) -> bool:
        """Block until no process of this action is alive; return False after ``timeout`` s."""
        if self.mechanism == CGROUP:
            cgroup = self._live_cgroup
            return True if cgroup is None else wait_for_event(cgroup, "populated", "0", timeout)

        deadline = time.monotonic() + timeout
        while True:
            live = self.members()
            if not live:
                return True
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            wait_for_any_exit(live, remaining)

    def cpu_usage_seconds(self) -> Optional[float]:
        """Return the CPU time in seconds used in the action's cgroup; None without one.

        After ``release()`` removed the cgroup, this is the value read just before.
        """
        with self._lock:
            if self._removed:
                return self._final_cpu_usage
            cgroup = self.cgroup_path
        return None if cgroup is None else read_cpu_usage(cgroup)

    def release(self) -> None:
        """Remove the action's cgroup after the action ended, if no process is left in it.

        A cgroup that still contains processes, such as a daemon that an environment
        started on purpose, stays until ``SessionProcesses.kill_all()`` and ``close()``.
        After a kill this waits up to two seconds for the killed processes to exit.
        """
        self._remove_cgroup(_KILLED_EXIT_TIMEOUT if self._killed else 0.0)

    def _remove_cgroup(self, timeout: float) -> bool:
        """Remove the cgroup if it empties within ``timeout`` s; return whether it is gone."""
        cgroup = self._live_cgroup
        if cgroup is None:
            return True
        if timeout > 0:
            wait_for_event(cgroup, "populated", "0", timeout)

        with self._lock:
            if self._removed:
                return True
            usage = read_cpu_usage(cgroup)
            if not remove_cgroup_dir(cgroup):
                return False
            self._final_cpu_usage = usage
            self._removed = True
        self._on_removed()
        return True


class SessionProcesses:
    """The processes of every action of one Session.

    ``mechanism`` is ``"cgroup"`` or ``"process-group"`` (see the module documentation).
    In a ``cgroup`` session one action can still use ``"process-group"`` when moving it
    into its cgroup failed; its ``ActionProcesses.mechanism`` shows that.
    """

    def __init__(self, session_id: str, mechanism: Optional[str] = None) -> None:
        """Choose the mechanism and, for ``cgroup``, create the session's cgroup.

        ``mechanism`` is ``"auto"``, ``"cgroup"`` or ``"process-group"``; None reads
        ``OPENJD_SESSIONS_PROCESS_TRACKING``.

        Raises:
            ValueError: the mechanism is not one of the three names.
            RuntimeError: ``cgroup`` was requested but no writable cgroup v2 is available.
        """
        source = "mechanism argument"
        if mechanism is None:
            mechanism = os.environ.get(TRACKING_ENV_VAR, "") or "auto"
            source = f"{TRACKING_ENV_VAR} environment variable"
        if mechanism not in ("auto", CGROUP, PROCESS_GROUP):
            raise ValueError(
                f"Invalid process tracking mechanism {mechanism!r} in the {source}: use"
                f" 'auto', '{CGROUP}' or '{PROCESS_GROUP}'."
            )

        self._lock = threading.Lock()
        # Actions by sequence number; an action leaves once its cgroup is removed.
        self._actions: dict[int, ActionProcesses] = {}
        self._action_count = 0
        self._closed = False
        self.cgroup_path: Optional[str] = None
        if mechanism != PROCESS_GROUP:
            self.cgroup_path, reason = create_session_cgroup(session_id)
            if self.cgroup_path is None and mechanism == CGROUP:
                raise RuntimeError(
                    f"Process tracking '{CGROUP}' was requested in the {source}, but {reason}."
                    f" Run as root or in a delegated cgroup, or use '{PROCESS_GROUP}'."
                )
        self.mechanism = PROCESS_GROUP if self.cgroup_path is None else CGROUP
        if self.cgroup_path is not None:
            # A session that is dropped without close() still removes its empty cgroups.
            weakref.finalize(self, _remove_empty_tree, self.cgroup_path)
        self._use_kill_file = self.cgroup_path is not None and os.path.exists(
            os.path.join(self.cgroup_path, "cgroup.kill")
        )

    def __repr__(self) -> str:
        return f"<SessionProcesses mechanism={self.mechanism} cgroup={self.cgroup_path}>"

    def track(self, pid: int) -> ActionProcesses:
        """Start tracking the action whose main process is ``pid``; call right after spawn.

        Raises:
            RuntimeError: ``close()`` was called.
        """
        with self._lock:
            if self._closed:
                raise RuntimeError(f"Cannot track pid {pid}: the session's processes are closed.")
            self._action_count += 1
            number = self._action_count
            cgroup = None
            if self.cgroup_path is not None:
                cgroup = os.path.join(self.cgroup_path, f"action-{number}")
            forget = functools.partial(self._forget, number)
            action = ActionProcesses(pid, cgroup, self._use_kill_file, forget)
            self._actions[number] = action
        return action

    def _forget(self, number: int) -> None:
        with self._lock:
            self._actions.pop(number, None)

    def kill_all(self) -> list[int]:
        """SIGKILL every remaining process of every action; return the pids signalled.

        Does not wait for the processes to exit; ``close()`` waits before removing cgroups.

        Raises:
            KillPermissionError: some processes belong to another user; all others were
                signalled.
        """
        with self._lock:
            actions = list(self._actions.values())
        signalled: list[int] = []
        roots: list[ActionRoot] = []
        for action in actions:
            if action.mechanism == CGROUP:
                signalled.extend(action.kill())
            else:
                action._killed = True
                roots.append(action._root)

        # One scan serves every process-group action, however many the session ran.
        denied: list[int] = []
        if roots:
            by_scan, denied = kill_by_scan(roots)
            signalled.extend(by_scan)
        if denied:
            raise KillPermissionError(denied, sorted(signalled))
        return sorted(signalled)

    def close(self, timeout: float = 5.0) -> None:
        """Remove this session's empty cgroups; calling it again does nothing.

        Cgroups of killed actions get up to ``timeout`` seconds in total to empty. A cgroup
        whose processes were never killed stays, and so does the session's cgroup above it.
        """
        with self._lock:
            if self._closed:
                return
            self._closed = True
            actions = list(self._actions.values())

        deadline = time.monotonic() + timeout
        all_removed = True
        for action in actions:
            wait = max(0.0, deadline - time.monotonic()) if action._killed else 0.0
            all_removed = action._remove_cgroup(wait) and all_removed
        if self.cgroup_path is not None and all_removed:
            remove_cgroup_dir(self.cgroup_path)


def _remove_empty_tree(session_cgroup: str) -> None:
    """Remove the empty action cgroups of a session cgroup, then the session cgroup."""
    try:
        names = os.listdir(session_cgroup)
    except OSError:
        return
    for name in names:
        if name.startswith("action-"):
            remove_cgroup_dir(os.path.join(session_cgroup, name))
    remove_cgroup_dir(session_cgroup)
