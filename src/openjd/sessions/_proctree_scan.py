"""The host's process table, for the ``process-group`` mechanism of ``_proctree``.

On Linux the table comes from ``/proc/<pid>/stat``; on macOS from ``/bin/ps``. An action is
identified by its main process (pid and start time), and its processes are selected from
one snapshot of the table by process group, session id and parent links.
"""

from __future__ import annotations

import os
import select
import signal
import subprocess
import sys
import time
from collections.abc import Iterable, Mapping
from typing import NamedTuple, Optional

__all__ = (
    "ActionRoot",
    "ProcessInfo",
    "children_by_parent",
    "kill_by_scan",
    "read_proc_stat",
    "scan_processes",
    "select_action_processes",
    "still_running",
    "wait_for_any_exit",
)

# A kill scans again after each round of signals, because a process can fork until its
# SIGKILL arrives. Each round signals every process found, so rounds beyond a handful only
# happen while setpgid() children keep appearing.
_MAX_KILL_ROUNDS = 20
_MAX_WAIT_PIDS = 64
_MAX_LISTINGS = 10  # Bounds a scan on a host that starts processes all the time.
# Helper programs run by absolute path only, never found through PATH.
_PS = next((p for p in ("/bin/ps", "/usr/bin/ps") if os.access(p, os.X_OK)), None)


class ProcessInfo(NamedTuple):
    """One row of the process table."""

    pid: int
    ppid: int
    pgid: int
    sid: int
    start_time: Optional[int]  # Clock ticks after boot on Linux; None where unknown.
    zombie: bool


class ActionRoot(NamedTuple):
    """The main process of one action and what is known about its identity."""

    pid: int
    start_time: Optional[int]  # None where not read: then the pid alone identifies it.
    reaped: bool = False  # Known to be reaped, so a process with this pid is another one.


def read_proc_stat(pid: int) -> Optional[ProcessInfo]:
    """Read ``/proc/<pid>/stat``; return None if the process is gone."""
    try:
        fd = os.open(f"/proc/{pid}/stat", os.O_RDONLY)
    except OSError:
        return None
    try:
        data = os.read(fd, 4096)
    except OSError:
        return None
    finally:
        os.close(fd)

    # The command name (field 2) may contain spaces and ")", so split after the last ")".
    fields = data[data.rfind(b")") + 2 :].split()
    if len(fields) < 20:
        return None
    return ProcessInfo(
        pid=pid,
        ppid=int(fields[1]),
        pgid=int(fields[2]),
        sid=int(fields[3]),
        start_time=int(fields[19]),
        zombie=fields[0] in (b"Z", b"X"),
    )


def scan_processes() -> dict[int, ProcessInfo]:
    """Return every process on the host by pid."""
    if sys.platform == "darwin":
        return _scan_processes_with_ps()
    # A process forked after a listing of /proc and whose parent exited before its stat
    # was read would be in no table, so list again until a listing shows no new pid.
    table: dict[int, ProcessInfo] = {}
    seen: set[str] = set()
    for _ in range(_MAX_LISTINGS):
        new = [name for name in os.listdir("/proc") if name.isdigit() and name not in seen]
        if not new:
            break
        seen.update(new)
        for name in new:
            proc = read_proc_stat(int(name))
            if proc is not None:
                table[proc.pid] = proc
    return table


def _scan_processes_with_ps() -> dict[int, ProcessInfo]:
    # NOTE: untested on macOS. Its ps has no session id column, so getsid() supplies it, and
    # no start time is read, so a reused main pid is not detected there.
    if _PS is None:
        return {}
    result = subprocess.run(
        [_PS, "-A", "-o", "pid=,ppid=,pgid=,stat="],
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        check=False,
    )
    table: dict[int, ProcessInfo] = {}
    for line in result.stdout.splitlines():
        parts = line.split()
        if len(parts) < 4 or not all(part.isdigit() for part in parts[:3]):
            continue
        pid, ppid, pgid = int(parts[0]), int(parts[1]), int(parts[2])
        try:
            sid = os.getsid(pid)
        except OSError:
            sid = -1
        table[pid] = ProcessInfo(pid, ppid, pgid, sid, None, parts[3].startswith("Z"))
    return table


def children_by_parent(table: Mapping[int, ProcessInfo]) -> dict[int, list[int]]:
    """Return the pids in ``table`` grouped by parent pid."""
    children: dict[int, list[int]] = {}
    for proc in table.values():
        children.setdefault(proc.ppid, []).append(proc.pid)
    return children


def select_action_processes(table: Mapping[int, ProcessInfo], roots: Iterable[ActionRoot]) -> set[int]:
    """Return the live pids in ``table`` that belong to any of ``roots``.

    These are the root itself, every process whose group or session id is the root pid,
    and every descendant of those. A root whose pid now names another process (it is known
    to be reaped, or the start time differs) had its pid reused, so it selects nothing.
    Linux does not reuse a pid while a process group or session of that id exists.
    """
    valid: set[int] = set()
    for root in roots:
        current = table.get(root.pid)
        if current is None:
            valid.add(root.pid)
        elif not root.reaped and root.start_time in (None, current.start_time):
            valid.add(root.pid)

    found = {proc.pid for proc in table.values() if proc.pgid in valid or proc.sid in valid}
    found.update(pid for pid in valid if pid in table)
    children = children_by_parent(table)
    pending = list(found)
    while pending:
        for child in children.get(pending.pop(), ()):
            if child not in found:
                found.add(child)
                pending.append(child)

    found.difference_update((0, 1, os.getpid()))
    return {pid for pid in found if not table[pid].zombie}


def kill_by_scan(roots: list[ActionRoot]) -> tuple[dict[int, Optional[int]], list[int]]:
    """SIGKILL every process of ``roots``.

    Returns the processes signalled (pid to start time) and the pids refused with EPERM.
    Processes that exited meanwhile are skipped.
    """
    signalled: dict[int, Optional[int]] = {}
    denied: set[int] = set()
    for _ in range(_MAX_KILL_ROUNDS):
        table = scan_processes()
        targets = select_action_processes(table, roots) - signalled.keys() - denied
        if not targets:
            break

        # A group signal reaches every member at once, including children forked meanwhile.
        for pgid in {table[pid].pgid for pid in targets} & {root.pid for root in roots}:
            try:
                os.killpg(pgid, signal.SIGKILL)
            except OSError:
                pass  # Gone, or another user's group: each member is signalled next.
        for pid in sorted(targets):
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                continue
            except PermissionError:
                denied.add(pid)
                continue
            signalled[pid] = table[pid].start_time
    return signalled, sorted(denied)


def still_running(processes: Mapping[int, Optional[int]], table: Mapping[int, ProcessInfo]) -> set[int]:
    """Return the pids of ``processes`` (pid to start time) that are alive in ``table``."""
    return {
        pid
        for pid, start_time in processes.items()
        if pid in table and not table[pid].zombie and table[pid].start_time == start_time
    }


def wait_for_any_exit(pids: list[int], timeout: float) -> None:
    """Block until one of ``pids`` exits or ``timeout`` seconds pass.

    Waiting for a subset is enough for callers that scan again after each wake-up and wait
    for all processes to end, because none of them can end before the subset does.
    """
    pids = pids[:_MAX_WAIT_PIDS]
    if sys.platform.startswith("linux") and hasattr(os, "pidfd_open"):
        fds: list[int] = []
        try:
            poller = select.poll()
            for pid in pids:
                try:
                    fds.append(os.pidfd_open(pid))
                except OSError:
                    return  # Exited already; the caller scans again.
                poller.register(fds[-1], select.POLLIN)
            poller.poll(max(0, int(timeout * 1000) + 1))
        finally:
            for fd in fds:
                os.close(fd)
        return
    if sys.platform == "darwin":
        kqueue = select.kqueue()
        try:
            changes = [
                select.kevent(
                    pid,
                    filter=select.KQ_FILTER_PROC,
                    flags=select.KQ_EV_ADD | select.KQ_EV_ONESHOT,
                    fflags=select.KQ_NOTE_EXIT,
                )
                for pid in pids
            ]
            kqueue.control(changes, 1, timeout)
        except OSError:
            return  # One of them exited already; the caller scans again.
        finally:
            kqueue.close()
        return
    # NOTE: without pidfd (Linux before 5.3) this wakes every 50 ms to scan again.
    time.sleep(min(timeout, 0.05))
