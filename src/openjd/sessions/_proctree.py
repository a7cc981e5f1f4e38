"""Find and kill every process of an action, including descendants that left its group.

The library starts each action's main process in a new session, so the main pid is also its
process group id and its session id. Descendants can leave that group with ``setsid()`` or
``setpgid()`` and can outlive their parents. Two mechanisms find them:

``cgroup`` (Linux with a writable cgroup v2)
    Each ``SessionProcesses`` creates a cgroup ``openjd-<session id>-<random>`` below the
    cgroup of this process, and each tracked action gets a child cgroup ``action-<n>``.
    The child joins it before its command runs when it is a shell that writes
    ``next_procs_file()`` and then execs the command (the library's way, see ``_launch``),
    or when ``Popen`` gets ``child_setup()`` as ``preexec_fn``. Otherwise ``track()`` moves
    the main process and the descendants it already has. Either way everything the action
    starts later is born inside, whatever its session or group.
    A kill writes ``cgroup.kill`` (Linux 5.14 and later) or freezes the cgroup and signals
    every member. The cgroup of this process must be writable: as root, or in a subtree
    that systemd delegated to this user. Moving a process into a cgroup waits for an RCU
    grace period unless the cgroup2 file system is mounted with ``favordynmods`` (Linux
    6.0 and later). That took 4 to 23 ms per move on a loaded two-CPU VM with Linux 6.18.
``process-group`` (every other case, and always on macOS)
    A kill sends SIGKILL to the main pid's process group, to every process whose process
    group or session id is the main pid, and to every live descendant of those processes.
    It scans again until a scan finds no process it has not signalled yet, which catches
    processes forked during the kill. It misses a process outside the main pid's session
    whose parent exited before the kill, such as a ``setsid()`` grandchild of an exited
    child or a double-forked daemon. It also misses a chain of processes that each fork
    and exit faster than one scan of ``/proc`` takes.

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
import signal
import sys
import threading
import time
import weakref
from typing import Callable, Optional, Protocol

from ._proctree_cgroup import (
    VANISHED_ERRNOS,
    create_session_cgroup,
    is_in_cgroup,
    join_cgroup,
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
    still_running,
    wait_for_any_exit,
)

__all__ = (
    "CGROUP",
    "PROCESS_GROUP",
    "TRACKING_ENV_VAR",
    "ActionProcesses",
    "KillPermissionError",
    "SessionProcesses",
    "Standby",
)

TRACKING_ENV_VAR = "OPENJD_SESSIONS_PROCESS_TRACKING"
CGROUP = "cgroup"
PROCESS_GROUP = "process-group"

# How many standby processes a session keeps. With two, each has the time of a whole action
# to start before it is used, even when actions follow each other at once.
STANDBY_DEPTH = 2

# How long close() waits for standby processes that are still starting.
_STANDBY_SETTLE_TIMEOUT = 5.0

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


class Standby(Protocol):
    """A process that was started ahead of an action and can be ended unused."""

    def discard(self) -> None:
        """End the process and hand its cgroup back; must not raise."""


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
        prepared: bool,
        use_kill_file: bool,
        on_removed: Callable[[], None],
        joins_itself: bool = False,
        recycle: Optional[Callable[[str], None]] = None,
        recycled: bool = False,
    ) -> None:
        self.main_pid = main_pid
        self.mechanism = PROCESS_GROUP
        self.cgroup_path: Optional[str] = None
        # Why the move into the cgroup failed, for the caller to log; None when the move
        # worked, was not tried, or failed only because the process had already exited.
        self.tracking_error: Optional[OSError] = None
        self._use_kill_file = use_kill_file
        self._on_removed = on_removed
        self._recycle = recycle
        # CPU time that earlier actions used in a recycled cgroup.
        self._cpu_baseline = (read_cpu_usage(cgroup) or 0.0) if cgroup is not None and recycled else 0.0
        self._lock = threading.Lock()
        self._killed = False
        self._removed = False
        self._final_cpu_usage: Optional[float] = None
        self._root = ActionRoot(main_pid, None)
        # A pidfd of the main process: pidfd_send_signal() on it fails once that process is reaped.
        self._pidfd: Optional[int] = None
        self._pidfd_closer: Optional[weakref.finalize[[int], ActionProcesses]] = None
        # Processes that kill() signalled, by pid, with their start time. Once its parent
        # died, a killed process that has not exited yet is reachable only through this.
        self._signalled: dict[int, Optional[int]] = {}

        if cgroup is not None and joins_itself:
            # The shell in front of the command joins before it runs the command. If the join
            # fails it exits without running anything, so there is nothing to move.
            self.mechanism = CGROUP
            self.cgroup_path = cgroup
            return
        if cgroup is not None:
            try:
                if not prepared:
                    os.mkdir(cgroup)
                if not (prepared and is_in_cgroup(main_pid, cgroup)):
                    move_into_cgroup(cgroup, main_pid)
                    # The kernel accepts a zombie without moving it, so check the result.
                    if not is_in_cgroup(main_pid, cgroup):
                        raise ProcessLookupError(errno.ESRCH, f"process {main_pid} already exited")
            except OSError as err:
                remove_cgroup_dir(cgroup)
                if err.errno not in VANISHED_ERRNOS:
                    self.tracking_error = err
            else:
                self.mechanism = CGROUP
                self.cgroup_path = cgroup
                return
        if sys.platform.startswith("linux"):
            self._watch_main_process()

    def __repr__(self) -> str:
        return f"<ActionProcesses main_pid={self.main_pid} mechanism={self.mechanism}>"

    def _watch_main_process(self) -> None:
        """Keep a pidfd of the main process, or else its start time, to detect a reused pid.

        Reading ``/proc/<pid>/stat`` right after the spawn waits for the exec to finish
        (about 1 ms on a loaded host), while pidfd_open() returns at once.
        """
        if hasattr(os, "pidfd_open"):
            try:
                fd = os.pidfd_open(self.main_pid)
            except ProcessLookupError:
                self._root = ActionRoot(self.main_pid, None, reaped=True)
                return
            except OSError:
                pass  # Linux before 5.3: read the start time instead.
            else:
                self._pidfd = fd
                self._pidfd_closer = weakref.finalize(self, os.close, fd)
                return
        proc = read_proc_stat(self.main_pid)
        self._root = ActionRoot(self.main_pid, proc.start_time if proc else None)

    def _current_root(self) -> ActionRoot:
        """Return the main process's identity, noting when it has been reaped."""
        with self._lock:
            if self._pidfd is not None:
                try:
                    signal.pidfd_send_signal(self._pidfd, 0)
                except ProcessLookupError:
                    self._close_pidfd()
                    self._root = ActionRoot(self.main_pid, None, reaped=True)
                except PermissionError:
                    pass  # Another user's process, but it exists.
            return self._root

    def _close_pidfd(self) -> None:
        if self._pidfd_closer is not None:
            self._pidfd_closer()
        self._pidfd = None

    @property
    def _live_cgroup(self) -> Optional[str]:
        return None if self._removed else self.cgroup_path

    def kill(self) -> list[int]:
        """SIGKILL every process of this action and return the pids signalled, sorted.

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
            return [] if cgroup is None else sorted(kill_cgroup(cgroup, self._use_kill_file))

        signalled, denied = kill_by_scan([self._current_root()])
        with self._lock:
            self._signalled.update(signalled)
        if denied:
            raise KillPermissionError(denied, sorted(signalled))
        return sorted(signalled)

    def members(self) -> list[int]:
        """Return the pids of this action's live processes, sorted."""
        if self.mechanism == CGROUP:
            cgroup = self._live_cgroup
            return [] if cgroup is None else sorted(read_cgroup_pids(cgroup))

        root = self._current_root()
        table = scan_processes()
        with self._lock:
            dying = still_running(self._signalled, table)
            self._signalled = {pid: self._signalled[pid] for pid in dying}
        return sorted(select_action_processes(table, [root]) | dying)

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
        usage = None if cgroup is None else read_cpu_usage(cgroup)
        return None if usage is None else usage - self._cpu_baseline

    def release(self) -> None:
        """Remove the action's cgroup after the action ended, if no process is left in it.

        A cgroup that still contains processes, such as a daemon that an environment
        started on purpose, stays until ``SessionProcesses.kill_all()`` and ``close()``.
        After a kill this waits up to two seconds for the killed processes to exit. Call it
        after reaping the main process, so that its pidfd can be closed.
        """
        self._current_root()
        if not self._recycle_cgroup():
            self._remove_cgroup(0.0)

    def _recycle_cgroup(self) -> bool:
        """Hand an empty cgroup back to the session for the next action; return whether it was.

        Reusing a cgroup saves a mkdir() and an rmdir() on the path of every action. A cgroup
        that still holds processes (killed ones that are still exiting, or a daemon) stays
        with this action until ``close()``.
        """
        cgroup = self._live_cgroup
        if cgroup is None or self._recycle is None:
            return False
        if not wait_for_event(cgroup, "populated", "0", 0.0):
            return False
        with self._lock:
            if self._removed:
                return True
            usage = read_cpu_usage(cgroup)
            self._final_cpu_usage = None if usage is None else usage - self._cpu_baseline
            self._removed = True
        self._on_removed()
        self._recycle(cgroup)
        return True

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
        self._next_cgroup: Optional[str] = None  # Created by child_setup() for track().
        self._next_joins_itself = False  # next_procs_file() was used for the next child.
        self._spare: list[str] = []  # Empty action cgroups that earlier actions released.
        self._next_recycled = False
        self._standby: list[Standby] = []
        self._reserved = 0  # Cgroups from reserve_cgroup() that are not settled yet.
        self._settled = threading.Condition(self._lock)
        self._cgroup_count = 0
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
            weakref.finalize(self, _remove_empty_tree, self.cgroup_path, os.getpid(), self._standby)
        self._use_kill_file = self.cgroup_path is not None and os.path.exists(
            os.path.join(self.cgroup_path, "cgroup.kill")
        )

    def __repr__(self) -> str:
        return f"<SessionProcesses mechanism={self.mechanism} cgroup={self.cgroup_path}>"

    def child_setup(self) -> Optional[Callable[[], None]]:
        """Return a ``preexec_fn`` that puts the next spawned child in its action's cgroup.

        Pass it to ``subprocess.Popen`` and the child's pid to ``track()``. The child joins
        the cgroup before it execs, so none of its descendants can escape. A move after the
        spawn can take tens of milliseconds on a busy host, because the kernel waits for an
        RCU grace period, and the child keeps running meanwhile. Returns None for the
        ``process-group`` mechanism. Any ``preexec_fn`` makes ``Popen`` use fork() instead
        of vfork(), which took about 2 ms more per spawn in a small test process.
        """
        with self._lock:
            if self.cgroup_path is None or self._closed:
                return None
            if self._next_cgroup is None:
                self._next_recycled = bool(self._spare)
                self._next_cgroup = self._spare.pop() if self._spare else self._new_action_cgroup()
                if self._next_cgroup is None:
                    return None  # track() tries again and reports the error.
            procs_file = os.path.join(self._next_cgroup, "cgroup.procs")
        return functools.partial(join_cgroup, procs_file)

    def next_procs_file(self) -> Optional[str]:
        """Return the ``cgroup.procs`` file that the next child writes its own pid to.

        The child is meant to be a shell that writes its pid there and then execs the
        command, so the command and every descendant are born inside the cgroup. The next
        ``track()`` then expects the child to have joined by itself. Returns None for the
        ``process-group`` mechanism, or when the cgroup could not be created.
        """
        with self._lock:
            if self.cgroup_path is None or self._closed:
                return None
            if self._next_cgroup is None:
                self._next_recycled = bool(self._spare)
                self._next_cgroup = self._spare.pop() if self._spare else self._new_action_cgroup()
                if self._next_cgroup is None:
                    return None  # track() tries again and reports the error.
            self._next_joins_itself = True
            return os.path.join(self._next_cgroup, "cgroup.procs")

    def reserve_cgroup(self) -> Optional[tuple[str, bool]]:
        """Set aside an empty action cgroup for a process started ahead of its action.

        Returns the cgroup and whether an earlier action used it, or None without cgroups.
        Give it to ``track_joined()`` once the action starts, or back to ``return_cgroup()``.
        """
        with self._lock:
            if self.cgroup_path is None or self._closed:
                return None
            if self._spare:
                self._reserved += 1
                return self._spare.pop(), True
            cgroup = self._new_action_cgroup()
            if cgroup is None:
                return None
            self._reserved += 1
        return cgroup, False

    def settle_reservation(self) -> None:
        """Note that a cgroup from ``reserve_cgroup()`` is kept by a standby, returned, or removed.

        ``close()`` waits for every reservation to settle, so that it never returns while a
        standby process is still starting in a cgroup it does not know of.
        """
        with self._lock:
            self._reserved -= 1
            self._settled.notify_all()

    def return_cgroup(self, cgroup: str) -> None:
        """Take back a cgroup from ``reserve_cgroup()`` whose process was never used and is gone."""
        self._recycle_cgroup(cgroup)

    def track_joined(self, pid: int, cgroup: str, recycled: bool) -> ActionProcesses:
        """Start tracking an action whose main process ``pid`` joined ``cgroup`` by itself.

        Raises:
            RuntimeError: ``close()`` was called.
        """
        with self._lock:
            return self._add_action(pid, cgroup, True, True, recycled)

    def put_standby(self, standby: Standby) -> bool:
        """Keep ``standby`` (a process started ahead of a later action) until it is taken.

        Returns False, keeping nothing, when ``STANDBY_DEPTH`` are kept or ``close()`` was called.
        """
        with self._lock:
            if len(self._standby) >= STANDBY_DEPTH or self._closed:
                return False
            self._standby.append(standby)
            return True

    def standby_count(self) -> int:
        """Return how many standby processes are kept."""
        return len(self._standby)

    def take_standby(self) -> Optional[Standby]:
        """Return the oldest kept standby and forget it, or None."""
        with self._lock:
            return self._standby.pop(0) if self._standby else None

    def discard_standby(self) -> None:
        """End every kept standby process."""
        with self._lock:
            standby = list(self._standby)
            self._standby.clear()
        for process in standby:
            process.discard()

    def track(self, pid: int) -> ActionProcesses:
        """Start tracking the action whose main process is ``pid``; call right after spawn.

        Raises:
            RuntimeError: ``close()`` was called.
        """
        with self._lock:
            prepared = self._next_cgroup is not None
            cgroup = self._next_cgroup
            joins_itself = self._next_joins_itself
            recycled = self._next_recycled
            self._next_cgroup = None
            self._next_joins_itself = False
            self._next_recycled = False
            if cgroup is None and self.cgroup_path is not None:
                self._cgroup_count += 1
                cgroup = os.path.join(self.cgroup_path, f"action-{self._cgroup_count}")
            return self._add_action(pid, cgroup, prepared, joins_itself, recycled)

    def _add_action(
        self, pid: int, cgroup: Optional[str], prepared: bool, joins_itself: bool, recycled: bool
    ) -> ActionProcesses:
        """Create and register the ``ActionProcesses`` of a new action; call with the lock held."""
        if self._closed:
            raise RuntimeError(f"Cannot track pid {pid}: the session's processes are closed.")
        self._action_count += 1
        forget = functools.partial(self._forget, self._action_count)
        action = ActionProcesses(
            pid, cgroup, prepared, self._use_kill_file, forget, joins_itself, self._recycle_cgroup, recycled
        )
        self._actions[self._action_count] = action
        return action

    def _new_action_cgroup(self) -> Optional[str]:
        """Create the cgroup for the next action; call with the lock held."""
        assert self.cgroup_path is not None
        self._cgroup_count += 1
        path = os.path.join(self.cgroup_path, f"action-{self._cgroup_count}")
        try:
            os.mkdir(path)
        except OSError:
            return None
        return path

    def _recycle_cgroup(self, cgroup: str) -> None:
        with self._lock:
            if not self._closed:
                self._spare.append(cgroup)
                return
        remove_cgroup_dir(cgroup)
        if self.cgroup_path is not None:
            # A standby shell that was still starting when close() ran kept the session's
            # cgroup from being removed then; this fails harmlessly while others remain.
            remove_cgroup_dir(self.cgroup_path)

    def _forget(self, number: int) -> None:
        with self._lock:
            self._actions.pop(number, None)

    def kill_all(self) -> list[int]:
        """SIGKILL every remaining process of every action; return the pids signalled.

        Does not wait for the processes to exit; ``close()`` waits before removing cgroups.
        A standby process is ended first; it belongs to no action.

        Raises:
            KillPermissionError: some processes belong to another user; all others were
                signalled.
        """
        self.discard_standby()
        with self._lock:
            actions = list(self._actions.values())
        signalled: list[int] = []
        roots: list[ActionRoot] = []
        for action in actions:
            if action.mechanism == CGROUP:
                signalled.extend(action.kill())
            else:
                action._killed = True
                roots.append(action._current_root())

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
            self._settled.wait_for(lambda: self._reserved <= 0, _STANDBY_SETTLE_TIMEOUT)
            standby = list(self._standby)
            self._standby.clear()
            actions = list(self._actions.values())
            unused = [*self._spare, self._next_cgroup]
            self._spare = []
        for process in standby:
            process.discard()  # Hands its cgroup back, which removes it now that the session is closed.
        for cgroup in unused:
            if cgroup is not None:
                remove_cgroup_dir(cgroup)

        deadline = time.monotonic() + timeout
        all_removed = True
        for action in actions:
            action._current_root()  # Closes the pidfd of a reaped main process.
            wait = max(0.0, deadline - time.monotonic()) if action._killed else 0.0
            all_removed = action._remove_cgroup(wait) and all_removed
        if self.cgroup_path is not None and all_removed:
            remove_cgroup_dir(self.cgroup_path)


def _remove_empty_tree(session_cgroup: str, owner_pid: int, standby: list[Standby]) -> None:
    """End the standby processes, then remove the empty action cgroups and the session cgroup.

    Does nothing in a forked child of the owner, which must not remove the cgroup of an
    action that the owner is about to start.
    """
    if os.getpid() != owner_pid:
        return
    for process in list(standby):
        try:
            process.discard()
        except Exception:  # noqa: BLE001 - a finalizer must not raise, and the rmdir below still runs.
            pass
    standby.clear()
    try:
        names = os.listdir(session_cgroup)
    except OSError:
        return
    for name in names:
        if name.startswith("action-"):
            remove_cgroup_dir(os.path.join(session_cgroup, name))
    remove_cgroup_dir(session_cgroup)
