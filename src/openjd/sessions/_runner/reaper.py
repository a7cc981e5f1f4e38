"""The reaper of a cluster worker: when the worker exits, kill what it left running.

``containment.guard_worker_process`` starts it as
``python -m openjd.sessions._runner.reaper --pid PID --marker NAME=TOKEN [--cgroup DIR]``
with a pipe on stdin. End of file on stdin means the worker exited. The reaper then
kills every process in the cgroup subtree DIR and removes it, kills every process whose
environment contains NAME=TOKEN, reports on stderr what it killed, and exits. It uses
only the standard library, so it starts fast.
"""

from __future__ import annotations

import argparse
import errno
import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from typing import Optional

# How long the reaper waits for killed processes to leave the cgroup, and how many times it
# scans for marked processes, which catches processes forked while it kills.
_CGROUP_EMPTY_TIMEOUT = 10.0
_MARKER_SCAN_ROUNDS = 20
_SCAN_PAUSE = 0.05


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="openjd-sessions-reaper", description=__doc__)
    parser.add_argument("--pid", type=int, required=True, help="process id of the watched worker")
    parser.add_argument("--marker", required=True, help="NAME=TOKEN in the environment of the worker's processes")
    parser.add_argument("--cgroup", help="cgroup v2 directory that contains the worker and its processes")
    args = parser.parse_args(argv)

    # Terminal signals belong to the worker, and the pipe decides when the reaper acts.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    while sys.stdin.buffer.read(65536):
        pass
    wait_for_parent_exit(args.pid)

    killed: set[int] = set()
    if args.cgroup:
        killed |= kill_cgroup_tree(args.cgroup)
    killed |= kill_marked_processes(args.marker.encode())
    killed.discard(args.pid)
    if killed:
        _report(f"worker process {args.pid} exited; killed {len(killed)} process(es) it left running: {sorted(killed)}")
    if args.cgroup:
        remove_cgroup_tree(args.cgroup)
    return 0


def wait_for_parent_exit(pid: int) -> None:
    """Wait until the worker ``pid``, the parent of this process, has exited completely.

    Linux closes the files of an exiting process before the process leaves its cgroup, so
    the end of file can come while the worker is still in the cgroup. Killing the cgroup
    then would turn a clean exit into a SIGKILL. The kernel gives this process a new parent
    only after the last thread of the worker has left its cgroup.
    """
    while os.getppid() == pid:
        time.sleep(_SCAN_PAUSE)


def kill_cgroup_tree(path: str) -> set[int]:
    """SIGKILL every process in the cgroup ``path`` and below, and wait until it is empty."""
    members = _cgroup_members(path)
    kill_file = os.path.join(path, "cgroup.kill")
    if os.path.exists(kill_file):
        try:
            with open(kill_file, "w", encoding="ascii") as file:
                file.write("1")
        except OSError as exc:
            _report(f"cannot write {kill_file} ({exc}); killing its processes one by one")

    deadline = time.monotonic() + _CGROUP_EMPTY_TIMEOUT
    while True:
        remaining = _cgroup_members(path)
        members |= remaining
        if not remaining:
            return members
        if time.monotonic() > deadline:
            _report(f"processes {sorted(remaining)} are still in {path} after SIGKILL")
            return members
        # Linux before 5.14 has no cgroup.kill, and a process can fork while the reaper kills.
        for pid in remaining:
            _kill(pid)
        time.sleep(_SCAN_PAUSE)


def remove_cgroup_tree(path: str) -> None:
    """Remove the empty cgroup ``path`` and the cgroups below it, deepest first."""
    if not os.path.isdir(path):
        return
    directories = [root for root, _, _ in os.walk(path, topdown=False)]
    for directory in directories:
        for _ in range(40):
            try:
                os.rmdir(directory)
                break
            except FileNotFoundError:
                break
            except OSError as exc:
                # EBUSY while the kernel finishes removing exited processes from it.
                if exc.errno != errno.EBUSY:
                    _report(f"cannot remove cgroup {directory}: {exc}")
                    break
                time.sleep(_SCAN_PAUSE)


def kill_marked_processes(marker: bytes) -> set[int]:
    """SIGKILL every process whose environment contains ``marker``, scanning until none is left."""
    killed: set[int] = set()
    for _ in range(_MARKER_SCAN_ROUNDS):
        found = set(_marked_processes(marker)) - {os.getpid()}
        if not found:
            break
        for pid in found:
            _kill(pid)
        killed |= found
        time.sleep(_SCAN_PAUSE)
    return killed


def _marked_processes(marker: bytes) -> list[int]:
    if sys.platform.startswith("linux"):
        return _marked_processes_proc(marker)
    return _marked_processes_ps(marker)


def _marked_processes_proc(marker: bytes) -> list[int]:
    found = []
    for name in os.listdir("/proc"):
        if not name.isdigit():
            continue
        try:
            with open(f"/proc/{name}/environ", "rb") as file:
                variables = file.read().split(b"\0")
        except OSError:
            continue  # exited, or owned by a user that this process may not inspect
        if marker in variables:
            found.append(int(name))
    return found


def _marked_processes_ps(marker: bytes) -> list[int]:
    # NOTE: used on macOS and untested there. "ps -E" appends the environment to the command
    # for processes of the same user, or of every user for root.
    try:
        listing = subprocess.run(
            ["/bin/ps", "-E", "-ww", "-A", "-o", "pid=,command="], capture_output=True, check=False
        ).stdout
    except OSError:
        return []
    found = []
    for line in listing.splitlines():
        fields = line.split()
        if fields and fields[0].isdigit() and marker in fields[1:]:
            found.append(int(fields[0]))
    return found


def _cgroup_members(path: str) -> set[int]:
    members: set[int] = set()
    for root, _, files in os.walk(path):
        if "cgroup.procs" not in files:
            continue
        try:
            with open(os.path.join(root, "cgroup.procs"), encoding="ascii") as file:
                members.update(int(line) for line in file if line.strip())
        except OSError:
            continue  # removed meanwhile
    return members


def _kill(pid: int) -> None:
    try:
        os.kill(pid, signal.SIGKILL)
    except ProcessLookupError:
        pass
    except PermissionError as exc:
        _report(f"SIGKILL of process {pid} was not permitted: {exc}")


def _report(message: str) -> None:
    try:
        print(f"openjd-sessions reaper: {message}", file=sys.stderr, flush=True)
    except (OSError, ValueError):
        pass  # stderr of a dead worker may be a closed pipe


if __name__ == "__main__":
    sys.exit(main())
