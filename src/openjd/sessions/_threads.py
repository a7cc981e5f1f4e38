"""Threads for actions, kept for reuse while idle.

Each action runs on a thread of its own, and a session runs one action after another, so a
thread that just finished an action can take the next one. Starting a new thread costs a
stack mapping, a clone and a first handshake under the GIL, about 0.1 ms, and on a busy
two-CPU host it often waits behind the action's own child for a CPU. An idle thread ends
after ``_IDLE_SECONDS`` without work.
"""

from __future__ import annotations

import os
import threading
from typing import Callable, Optional

__all__ = ("start_thread",)

_IDLE_SECONDS = 30.0
_IDLE_NAME = "openjd-idle"

_lock = threading.Lock()
_idle: list[_Worker] = []


def _forget_idle_in_child() -> None:
    # A forked child has only the thread that forked: the idle threads exist only in the parent.
    global _lock
    _lock = threading.Lock()
    _idle.clear()


if hasattr(os, "register_at_fork"):  # POSIX only
    os.register_at_fork(after_in_child=_forget_idle_in_child)


def start_thread(target: Callable[[], None], name: str) -> threading.Thread:
    """Run ``target`` on an idle thread, or on a new daemon thread; return that thread."""
    with _lock:
        worker = _idle.pop() if _idle else None
    if worker is None:
        worker = _Worker()
        worker.hand(target, name)
        worker.thread.start()
    else:
        worker.hand(target, name)
    return worker.thread


class _Worker:
    def __init__(self) -> None:
        self._job: Optional[tuple[Callable[[], None], str]] = None
        self._has_job = threading.Lock()
        self._has_job.acquire()
        self.thread = threading.Thread(target=self._loop, name=_IDLE_NAME, daemon=True)

    def hand(self, target: Callable[[], None], name: str) -> None:
        self._job = (target, name)
        self._has_job.release()

    def _loop(self) -> None:
        while True:
            if not self._has_job.acquire(timeout=_IDLE_SECONDS):
                with _lock:
                    if self in _idle:
                        _idle.remove(self)
                        return
                # start_thread() took this worker from the idle list just now: its job follows.
                self._has_job.acquire()
            job = self._job
            assert job is not None
            self._job = None
            target, self.thread.name = job
            target()  # An exception ends this thread, as it would end a thread of its own.
            del job, target  # An idle thread must not keep the last action, and its session, alive.
            self.thread.name = _IDLE_NAME
            with _lock:
                _idle.append(self)
