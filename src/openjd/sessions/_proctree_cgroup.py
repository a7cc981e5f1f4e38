"""cgroup v2 file operations for the ``cgroup`` mechanism of ``_proctree`` (Linux only).

Every function takes the absolute path of a cgroup directory that ``_proctree`` created.
A cgroup that was removed meanwhile reads as empty, because its files raise ENOENT or
ENODEV.
"""

from __future__ import annotations

import errno
import os
import re
import secrets
import select
import signal
import sys
import time
from typing import Optional

from ._proctree_scan import children_by_parent, scan_processes

__all__ = (
    "VANISHED_ERRNOS",
    "create_session_cgroup",
    "find_own_cgroup_dir",
    "is_in_cgroup",
    "join_cgroup",
    "kill_cgroup",
    "move_into_cgroup",
    "read_cgroup_pids",
    "read_cpu_usage",
    "remove_cgroup_dir",
    "wait_for_event",
)

VANISHED_ERRNOS = (errno.ESRCH, errno.ENOENT, errno.ENODEV)
# A freeze completes when every task reaches the kernel's freezer trap, which a task in an
# uninterruptible sleep delays. After this many seconds the members are signalled anyway.
_FREEZE_TIMEOUT = 1.0


def find_own_cgroup_dir() -> tuple[Optional[str], str]:
    """Return the cgroup v2 directory of this process, or None and the reason."""
    if not sys.platform.startswith("linux"):
        return None, "cgroups exist only on Linux"
    try:
        with open("/proc/self/cgroup", encoding="utf-8") as file:
            own = next((ln[3:].rstrip("\n") for ln in file if ln.startswith("0::")), None)
        with open("/proc/self/mountinfo", encoding="utf-8") as file:
            mounts = [line.split() for line in file]
    except OSError as err:
        return None, f"/proc cannot be read ({err})"
    if own is None or not own.startswith("/") or "/.." in own:
        return None, "this process is not in a visible cgroup v2 hierarchy"

    # mountinfo fields: id, parent, major:minor, root, mount point, options..., "-", fstype.
    for fields in mounts:
        if "-" not in fields:
            continue
        separator = fields.index("-")
        if separator + 1 >= len(fields) or fields[separator + 1] != "cgroup2":
            continue
        mount_root, mount_point = _unescape(fields[3]), _unescape(fields[4])
        if mount_root == "/":
            relative = own
        elif own == mount_root or own.startswith(mount_root + "/"):
            relative = own[len(mount_root) :]
        else:
            continue
        directory = mount_point.rstrip("/") + relative.rstrip("/")
        if os.path.isdir(directory):
            return directory, ""
    return None, "no cgroup2 file system containing this process is mounted"


def _unescape(mountinfo_field: str) -> str:
    """Decode the octal escapes (``\\040`` for a space) that mountinfo uses in paths."""
    return re.sub(r"\\([0-7]{3})", lambda match: chr(int(match.group(1), 8)), mountinfo_field)


def create_session_cgroup(session_id: str) -> tuple[Optional[str], str]:
    """Create ``openjd-<session id>-<random>`` below this process's cgroup.

    Returns its path, or None and the reason it cannot be used.
    """
    parent, reason = find_own_cgroup_dir()
    if parent is None:
        return None, reason

    # Moving a process needs write access to cgroup.procs of the common ancestor of source
    # and destination, which is the cgroup of this process.
    if not os.access(os.path.join(parent, "cgroup.procs"), os.W_OK):
        return None, f"{parent}/cgroup.procs is not writable by this user"
    safe_id = re.sub(r"[^A-Za-z0-9_-]", "_", session_id)[:64]
    path = os.path.join(parent, f"openjd-{safe_id}-{secrets.token_hex(4)}")
    try:
        os.mkdir(path)
    except OSError as err:
        return None, f"{path} cannot be created ({err.strerror})"
    return path, ""


def _read(path: str) -> bytes:
    # Without the io module, which adds its own overhead to each of these small reads.
    fd = os.open(path, os.O_RDONLY)
    try:
        return os.read(fd, 65536)
    finally:
        os.close(fd)


def _write(path: str, text: str) -> None:
    fd = os.open(path, os.O_WRONLY)
    try:
        os.write(fd, text.encode())
    finally:
        os.close(fd)


def join_cgroup(procs_file: str) -> None:
    """Move the calling process into the cgroup of ``procs_file``; ignore any failure.

    Meant as ``preexec_fn`` of ``subprocess.Popen``: it runs in the child between fork and
    exec, makes only three system calls, and takes no lock that another thread of the
    parent could have held at fork time. A child it could not move is moved by
    ``move_into_cgroup()`` after the spawn.
    """
    try:
        fd = os.open(procs_file, os.O_WRONLY)
        try:
            os.write(fd, b"0")  # 0 stands for the writing process.
        finally:
            os.close(fd)
    except OSError:
        pass


def is_in_cgroup(pid: int, cgroup: str) -> bool:
    """Return whether ``pid`` is in ``cgroup``, comparing the last two path components."""
    suffix = ("/" + "/".join(cgroup.rstrip("/").split("/")[-2:])).encode()
    try:
        text = _read(f"/proc/{pid}/cgroup")
    except OSError:
        return False
    return any(line.startswith(b"0::") and line.endswith(suffix) for line in text.splitlines())


def move_into_cgroup(cgroup: str, pid: int) -> None:
    """Move ``pid`` and its current descendants into the existing ``cgroup``.

    Raises:
        OSError: ``pid`` cannot be moved (ESRCH when it no longer exists). Descendants
            that cannot be moved are skipped.
    """
    procs_file = os.path.join(cgroup, "cgroup.procs")
    _write(procs_file, str(pid))

    # Descendants forked between exec and the move are still outside. A parent is moved
    # before its children are listed, so a child it forks meanwhile is born inside.
    # NOTE: a descendant whose parent exited before the move stays outside. The move can
    # take tens of milliseconds on a busy host, so only join_cgroup() before exec is exact.
    scanned: Optional[dict[int, list[int]]] = None
    pending = [pid]
    while pending:
        parent = pending.pop()
        children = _list_children(parent)
        if children is None:
            if scanned is None:
                scanned = children_by_parent(scan_processes())
            children = scanned.get(parent, [])
        for child in children:
            try:
                _write(procs_file, str(child))
            except OSError:
                continue  # Exited meanwhile, or not movable.
            pending.append(child)


def _list_children(pid: int) -> Optional[list[int]]:
    """Return the children of ``pid``, or None if the kernel does not list them."""
    children: list[int] = []
    try:
        tids = os.listdir(f"/proc/{pid}/task")
    except OSError:
        return children
    for tid in tids:
        try:
            with open(f"/proc/{pid}/task/{tid}/children", "rb") as file:
                children.extend(int(token) for token in file.read().split())
        except FileNotFoundError:
            if os.path.isdir(f"/proc/{pid}/task/{tid}"):
                return None  # The kernel was built without CONFIG_PROC_CHILDREN.
        except OSError:
            pass
    return children


def read_cgroup_pids(cgroup: str) -> list[int]:
    """Return the pids listed in ``cgroup.procs`` (live processes, no zombies)."""
    try:
        fd = os.open(os.path.join(cgroup, "cgroup.procs"), os.O_RDONLY)
        try:
            chunks = [os.read(fd, 65536)]
            while chunks[-1]:
                chunks.append(os.read(fd, 65536))
        finally:
            os.close(fd)
        return [int(token) for token in b"".join(chunks).split()]
    except OSError as err:
        if err.errno in VANISHED_ERRNOS:
            return []
        raise


def wait_for_event(cgroup: str, key: str, value: str, timeout: float) -> bool:
    """Wait until ``cgroup.events`` shows ``key value``; a removed cgroup counts as a match.

    Returns False after ``timeout`` seconds. The kernel signals each change of this file as
    POLLPRI, so poll() blocks until something changes.
    """
    try:
        fd = os.open(os.path.join(cgroup, "cgroup.events"), os.O_RDONLY)
    except FileNotFoundError:
        return True
    try:
        poller = select.poll()
        poller.register(fd, select.POLLPRI)
        deadline = time.monotonic() + timeout
        expected = f"{key} {value}".encode()
        while True:
            try:
                # Reading also re-arms the notification, so poll() does not return at once.
                if expected in os.pread(fd, 4096, 0).splitlines():
                    return True
            except OSError as err:
                if err.errno in VANISHED_ERRNOS:
                    return True
                raise
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return False
            poller.poll(int(remaining * 1000) + 1)
    finally:
        os.close(fd)


def kill_cgroup(cgroup: str, use_kill_file: bool) -> list[int]:
    """SIGKILL every process in ``cgroup``; return the pids listed just before.

    ``use_kill_file`` selects ``cgroup.kill`` (Linux 5.14 and later); otherwise the cgroup
    is frozen, each member signalled, and the cgroup thawed.
    """
    pids = read_cgroup_pids(cgroup)
    try:
        if use_kill_file:
            _write(os.path.join(cgroup, "cgroup.kill"), "1")
            return pids

        # A frozen cgroup cannot fork, so the member list stays complete while each member
        # is signalled, and a frozen task still dies on SIGKILL.
        freeze_file = os.path.join(cgroup, "cgroup.freeze")
        _write(freeze_file, "1")
        try:
            wait_for_event(cgroup, "frozen", "1", _FREEZE_TIMEOUT)
            pids = read_cgroup_pids(cgroup)
            for pid in pids:
                try:
                    os.kill(pid, signal.SIGKILL)
                except ProcessLookupError:
                    pass
        finally:
            _write(freeze_file, "0")
    except OSError as err:
        if err.errno not in VANISHED_ERRNOS:
            raise
    return pids


def read_cpu_usage(cgroup: str) -> Optional[float]:
    """Return ``usage_usec`` from ``cpu.stat`` in seconds, or None if it cannot be read."""
    try:
        text = _read(os.path.join(cgroup, "cpu.stat"))
    except OSError:
        return None
    for line in text.splitlines():
        name, _, number = line.partition(b" ")
        if name == b"usage_usec":
            return int(number) / 1_000_000
    return None


def remove_cgroup_dir(path: str) -> bool:
    """Remove an empty cgroup; return False while processes are still in it."""
    try:
        os.rmdir(path)
    except FileNotFoundError:
        return True
    except OSError:
        return False  # EBUSY: it still contains processes or child cgroups.
    return True
