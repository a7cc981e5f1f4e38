"""The process layer: start one action's process, stream its output, signal it, reap it.

An ``ActionProcess`` owns the child, the read end of its output pipe and a wake-up pipe.
The action runner drives it from one thread with ``pump()``, which blocks on the output
pipe, the child's exit and the wake-up pipe together (epoll or kqueue through
``selectors``), so no loop polls on a timer. On Linux the child's exit is observed through a
pidfd; elsewhere a small thread blocks in ``wait4`` and writes to the wake-up pipe.
"""

from __future__ import annotations

import errno
import os
import select
import selectors
import signal
import threading
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Callable, Optional

from ._launch import ProcessRequest, prepare_standby, start_process
from ._output import LineSplitter
from ._proctree import CGROUP, SessionProcesses

__all__ = ("ActionProcess", "ProcessRequest", "ResourceUsage", "build_process_env", "prepare_standby")

_READ_SIZE = 1 << 16
# Output batches of all actions in this process take turns, because Python runs one thread
# at a time anyway. Threads that wait for this lock sleep, while threads that wait for the
# GIL wake every 5 ms to ask for it. With 32 busy sessions that cost more CPU than the
# output itself. A batch that waits longer than _OUTPUT_TURN_WAIT seconds, behind a slow
# log handler, goes ahead without its turn.
_OUTPUT_TURN = threading.Lock()
_OUTPUT_TURN_WAIT = 0.05
NOTIFY_SIGNAL = signal.SIGTERM  # The notify step of NOTIFY_THEN_TERMINATE on POSIX.


@dataclass(frozen=True)
class ResourceUsage:
    """CPU time and peak memory of a finished process and the descendants it waited for."""

    user_seconds: float
    system_seconds: float
    max_rss_kib: int


def build_process_env(overrides: Mapping[str, Optional[str]]) -> dict[bytes, bytes]:
    """Merge ``overrides`` over this process's environment; None values remove a variable.

    The result is in bytes, as the OS stores it: copying ``os.environb`` avoids decoding
    and re-encoding every host variable for every action.
    """
    # CPython keeps the environment as a bytes dict in os.environ._data on POSIX; copying it
    # directly is some 20 times faster than iterating os.environb.
    data = getattr(os.environ, "_data", None)
    env = dict(data) if isinstance(data, dict) else dict(os.environb)
    for name, value in overrides.items():
        key = os.fsencode(name)
        if value is None:
            env.pop(key, None)
        else:
            env[key] = os.fsencode(value)
    return env


class ActionProcess:
    """One running action process and its output pipe."""

    def __init__(
        self,
        request: ProcessRequest,
        tracker: SessionProcesses,
        on_lines: Callable[[list[str]], None],
    ) -> None:
        """Start the process; raise OSError if it cannot start.

        The child gets its own session and process group, stdin from /dev/null, and stdout
        and stderr on one pipe.
        """
        self._on_lines = on_lines
        self._splitter = LineSplitter()
        self._lock = threading.Lock()
        self.returncode: Optional[int] = None
        self.usage: Optional[ResourceUsage] = None
        self.output_closed = False

        self._popen, self.processes = start_process(request, tracker)
        self.pid = self._popen.pid

        assert self._popen.stdout is not None
        self._stdout = self._popen.stdout
        self._stdout_fd = self._stdout.fileno()
        os.set_blocking(self._stdout_fd, False)

        self._wake_read, self._wake_write = os.pipe()
        os.set_blocking(self._wake_read, False)
        self._selector = selectors.DefaultSelector()
        self._selector.register(self._stdout_fd, selectors.EVENT_READ, "output")
        self._selector.register(self._wake_read, selectors.EVENT_READ, "wake")
        self._pidfd: Optional[int] = None
        self._watch_exit()

    def __repr__(self) -> str:
        return f"<ActionProcess pid={self.pid} returncode={self.returncode}>"

    def _watch_exit(self) -> None:
        pidfd_open = getattr(os, "pidfd_open", None)
        if pidfd_open is not None:
            try:
                self._pidfd = pidfd_open(self.pid)
            except OSError:
                self._pidfd = None
        if self._pidfd is not None:
            self._selector.register(self._pidfd, selectors.EVENT_READ, "exit")
            return
        waiter = threading.Thread(target=self._wait_in_thread, name=f"openjd-wait-{self.pid}", daemon=True)
        waiter.start()

    def _wait_in_thread(self) -> None:
        # Wait without reaping, so that send_signal() never targets a reused pid.
        try:
            os.waitid(os.P_PID, self.pid, os.WEXITED | os.WNOWAIT)
        except ChildProcessError:
            pass
        self._reap(blocking=True)
        self.wake()

    def _reap(self, blocking: bool) -> None:
        with self._lock:
            if self.returncode is not None:
                return
            try:
                pid, status, rusage = os.wait4(self.pid, 0 if blocking else os.WNOHANG)
            except ChildProcessError:
                pid, status, rusage = self.pid, 0, None
            if pid == 0:
                return
            self.returncode = os.waitstatus_to_exitcode(status)
            self._popen.returncode = self.returncode
            if rusage is not None:
                self.usage = ResourceUsage(rusage.ru_utime, rusage.ru_stime, rusage.ru_maxrss)

    @property
    def exited(self) -> bool:
        """True once the main process has been reaped."""
        return self.returncode is not None

    def wake(self) -> None:
        """Make a blocked ``pump()`` return; safe from any thread."""
        try:
            os.write(self._wake_write, b"\0")
        except OSError:
            pass  # Closed after the action finished, or the pipe is full: pump wakes anyway.

    def pump(self, timeout: Optional[float]) -> None:
        """Wait up to ``timeout`` seconds for output, exit or a wake-up, and handle them."""
        if self.output_closed and self.exited:
            return
        for key, _ in self._selector.select(timeout):
            if key.data == "output":
                self._read_output()
            elif key.data == "exit":
                self._selector.unregister(key.fd)
                self._reap(blocking=True)
            else:
                try:
                    os.read(self._wake_read, 4096)
                except BlockingIOError:
                    pass

    def _read_output(self) -> None:
        try:
            data = os.read(self._stdout_fd, _READ_SIZE)
        except BlockingIOError:
            return
        except OSError as err:
            if err.errno != errno.EIO:
                raise
            data = b""
        if data:
            lines = self._splitter.feed(data)
        else:
            lines = self._splitter.finish()
            self.output_closed = True
            self._selector.unregister(self._stdout_fd)
        if lines:
            has_turn = _OUTPUT_TURN.acquire(timeout=_OUTPUT_TURN_WAIT)
            try:
                self._on_lines(lines)
            finally:
                if has_turn:
                    _OUTPUT_TURN.release()

    def writers_gone(self) -> bool:
        """Tell whether every process has closed its end of the output pipe (Linux, via POLLHUP).

        Data may still be buffered in the pipe then; reading it always reaches EOF.
        """
        if self.output_closed:
            return True
        poller = select.poll()
        poller.register(self._stdout_fd, select.POLLIN)
        return any(events & select.POLLHUP for _, events in poller.poll(0))

    def flush_partial_output(self) -> None:
        """Deliver a final line that has no newline yet; used when the action stops waiting."""
        lines = self._splitter.finish()
        if lines:
            self._on_lines(lines)

    def send_signal(self, signum: int) -> None:
        """Send ``signum`` to the main process only, unless it was already reaped."""
        with self._lock:
            if self.returncode is None:
                os.kill(self.pid, signum)

    def kill_tree(self) -> list[int]:
        """SIGKILL every process of the action, including descendants that left its group.

        The process group goes first: a child that has not yet joined its cgroup (see
        ``SessionProcesses.next_procs_file``) is still the leader of that group.
        """
        if self.processes.mechanism != CGROUP:
            # The scan must see the tree before the main process dies: its children that
            # left the group would be orphaned, and the scan could no longer reach them.
            killed = self.processes.kill()
            self._kill_group()
            return killed
        self._kill_group()
        return self.processes.kill()

    def kill_group_early(self) -> None:
        """SIGKILL the process group now if ``kill_tree()`` does that first anyway (cgroup mechanism).

        Callers log and then call ``kill_tree()``, and the process dies meanwhile. Under the
        ``process-group`` mechanism the scan has to come before any kill, so this does nothing.
        """
        if self.processes.mechanism == CGROUP:
            self._kill_group()

    def _kill_group(self) -> None:
        with self._lock:
            if self.returncode is None:
                try:
                    os.killpg(self.pid, signal.SIGKILL)
                except (ProcessLookupError, PermissionError):
                    pass  # The group is empty, or only another user's processes are left.

    def close(self) -> None:
        """Release file descriptors; the process must have been reaped or killed.

        The caller hands the action's cgroup back with ``processes.release()`` afterwards.
        """
        if not self.exited:
            self._reap(blocking=True)
        self._selector.close()
        for fd in (self._wake_read, self._wake_write, self._pidfd):
            if fd is not None:
                try:
                    os.close(fd)
                except OSError:
                    pass
        self._stdout.close()
