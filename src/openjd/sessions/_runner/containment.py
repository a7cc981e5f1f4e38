"""Kill what a cluster worker process started when that worker dies, even by SIGKILL.

A Session kills the processes of its actions on cancel and at ``cleanup()``, but a
worker process that is killed runs neither. Its running action and everything that
action started would then run on without a parent. ``guard_worker_process`` makes such a
tree findable and starts a watchdog, the reaper (``reaper.py``), that kills it:

* The reaper is a child process in a session of its own, started before the steps
  below so that it is outside what it kills. It reads a pipe whose only write end is in
  the worker. The read returns end of file when the worker exits for any reason, and then
  the reaper kills the worker's leftovers and exits.
* On Linux, when this process may write its cgroup v2 (as root, or in a subtree that
  systemd delegated), the worker moves itself into a new child cgroup
  ``openjd-worker-<pid>-<random>``. Every process it starts later is born inside that
  cgroup or a cgroup below it, including those that call ``setsid()``. The reaper kills
  the whole cgroup subtree and removes it.
* Everywhere on POSIX, the worker sets ``OPENJD_SESSIONS_WORKER_MARKER`` to a random
  token in its environment, which actions inherit. The reaper also kills every process
  whose environment has that token. This finds processes outside a cgroup, but misses a
  process that clears its environment.

NOTE: on Windows nothing is guarded yet: a Job object with KILL_ON_JOB_CLOSE would do it.
"""

from __future__ import annotations

import os
import re
import secrets
import subprocess
import sys
import threading
from typing import IO, Optional

__all__ = ("MARKER_VARIABLE", "WorkerGuard", "find_own_cgroup_dir", "guard_worker_process")

MARKER_VARIABLE = "OPENJD_SESSIONS_WORKER_MARKER"


class WorkerGuard:
    """The reaper of this process and what it watches."""

    def __init__(self, reaper: subprocess.Popen[bytes], marker: str, cgroup: Optional[str]) -> None:
        self.reaper = reaper
        self.marker = marker
        self.cgroup = cgroup
        # The write end of the reaper's stdin. It must stay open for the life of this process.
        self._pipe: Optional[IO[bytes]] = reaper.stdin


_guard: Optional[WorkerGuard] = None
_guard_lock = threading.Lock()


def guard_worker_process(*, use_cgroup: Optional[bool] = None) -> Optional[WorkerGuard]:
    """Start the reaper for this process once, and return it; ``None`` where unsupported.

    ``use_cgroup`` set to False skips the cgroup and relies on the environment marker,
    True requires the cgroup, and ``None`` uses it where possible.

    Raises:
        OSError: the reaper cannot be started, or ``use_cgroup`` is True and no writable
            cgroup v2 is available.
    """
    global _guard
    with _guard_lock:
        if _guard is not None or os.name != "posix":
            return _guard

        cgroup: Optional[str] = None
        if use_cgroup is not False:
            cgroup, reason = _create_worker_cgroup()
            if cgroup is None and use_cgroup:
                raise OSError(f"Cannot contain the worker in a cgroup: {reason}.")
        token = secrets.token_hex(16)
        marker = f"{MARKER_VARIABLE}={token}"
        command = [sys.executable, "-m", "openjd.sessions._runner.reaper", "--pid", str(os.getpid())]
        command += ["--marker", marker]
        if cgroup is not None:
            command += ["--cgroup", cgroup]
        # A session of its own keeps terminal signals meant for the worker away from the reaper.
        reaper = subprocess.Popen(command, stdin=subprocess.PIPE, stdout=subprocess.DEVNULL, start_new_session=True)

        if cgroup is not None:
            try:
                _write(os.path.join(cgroup, "cgroup.procs"), "0")  # 0 moves the writing process
            except OSError:
                cgroup = None
        os.environ[MARKER_VARIABLE] = token
        _guard = WorkerGuard(reaper, marker, cgroup)
        return _guard


def find_own_cgroup_dir() -> tuple[Optional[str], str]:
    """Return the cgroup v2 directory of this process, or ``None`` and the reason."""
    if not sys.platform.startswith("linux"):
        return None, "cgroups exist only on Linux"
    try:
        with open("/proc/self/cgroup", encoding="utf-8") as file:
            relative = next((line[3:].strip() for line in file if line.startswith("0::")), None)
        with open("/proc/self/mountinfo", encoding="utf-8") as file:
            mounts = [line.split() for line in file]
    except OSError as exc:
        return None, f"/proc cannot be read ({exc})"
    if relative is None or not relative.startswith("/"):
        return None, "this process is in no visible cgroup v2 hierarchy"

    # A mountinfo line: id, parent id, major:minor, root, mount point, options, "-", type, ...
    for fields in mounts:
        if "-" not in fields:
            continue
        dash = fields.index("-")
        if dash + 1 >= len(fields) or fields[dash + 1] != "cgroup2":
            continue
        root = _unescape(fields[3])
        mount_point = _unescape(fields[4])
        if root != "/" and relative != root and not relative.startswith(root + "/"):
            continue
        inside = relative if root == "/" else relative[len(root) :]
        directory = mount_point.rstrip("/") + inside.rstrip("/")
        if os.path.isdir(directory):
            return directory, ""
    return None, "no cgroup2 file system that contains this process is mounted"


def _create_worker_cgroup() -> tuple[Optional[str], str]:
    parent, reason = find_own_cgroup_dir()
    if parent is None:
        return None, reason
    if not os.access(os.path.join(parent, "cgroup.procs"), os.W_OK):
        return None, f"{parent}/cgroup.procs is not writable by this user"
    path = os.path.join(parent, f"openjd-worker-{os.getpid()}-{secrets.token_hex(4)}")
    try:
        os.mkdir(path)
    except OSError as exc:
        return None, f"{path} cannot be created ({exc.strerror})"
    return path, ""


def _unescape(field: str) -> str:
    """Decode the octal escapes, such as ``\\040`` for a space, that mountinfo uses."""
    return re.sub(r"\\([0-7]{3})", lambda match: chr(int(match.group(1), 8)), field)


def _write(path: str, text: str) -> None:
    with open(path, "w", encoding="ascii") as file:
        file.write(text)
