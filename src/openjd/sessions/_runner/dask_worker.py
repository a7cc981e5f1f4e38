"""The worker side of ``DaskBackend``: a worker plugin, the task function and the job calls.

The runner registers one ``SessionsPlugin`` per job. Dask sends it to every worker,
including workers that join or restart later, and calls ``setup`` there. The plugin keeps
the worker's Sessions of the job in a ``WorkerSessions`` and sends their events to the
runner in batches through ``Worker.log_event``. ``run_task`` is the
function of every Dask task, ``stop_job`` and ``close_job`` run through ``Client.run``.

This module imports ``distributed``, so only the Dask backend and the workers import it.
"""

from __future__ import annotations

import asyncio
import logging
import os
import threading
import time
from typing import Any, Callable, Optional

from distributed import Worker, WorkerPlugin, get_worker

from openjd.sessions import LOG

from .backend import CloseReport, TaskOutcome, TaskSpec
from .backend_dask import EVENT_TOPIC
from .containment import guard_worker_process
from .driver import LogForwarder
from .events import WIRE_FLUSH_KEY, ActionEvent, Event, LogEvent, SessionEvent, event_to_wire
from .plan import JobPlan
from .worker_sessions import WorkerSessions

__all__ = ("SessionsPlugin", "close_job", "run_task", "stop_job")

# Events wait at most this long on the worker before they are sent, and at most this many
# are sent in one message.
_FLUSH_PERIOD_SECONDS = 0.1
_MAX_BATCH = 500


class SessionsPlugin(WorkerPlugin):
    """Owner of one job's Sessions on a worker, from its first task to the job's end."""

    def __init__(
        self,
        plan: JobPlan,
        job_id: str,
        *,
        retain_working_dir: bool = False,
        verbose: bool = False,
        own_process_group: bool = False,
    ) -> None:
        # Only these attributes are pickled and sent to the workers. ``setup`` adds the rest.
        self.plan = plan
        self.job_id = job_id
        self.retain_working_dir = retain_working_dir
        self.verbose = verbose
        self.own_process_group = own_process_group

    def setup(self, worker: Worker) -> None:
        self._label = str(worker.address)
        job_id = self.job_id
        self._sink = _TopicSink(lambda batch: worker.log_event(EVENT_TOPIC, {"job": job_id, "events": batch}))
        if self.own_process_group and os.name == "posix":
            # Leave the runner's process group, so that Ctrl-C in the runner's terminal
            # reaches only the runner, which cancels the job through stop_job.
            _leave_process_group()
        try:
            guard_worker_process()
        except OSError as exc:
            self._sink.emit(
                LogEvent(
                    session_id=None,
                    level="WARNING",
                    message=f"Processes of a task on this worker may outlive the worker if it dies: {exc}",
                    time=time.time(),
                    worker=self._label,
                )
            )
        self._forwarder = LogForwarder(self._sink, only_registered=True)
        LOG.addHandler(self._forwarder)
        self._previous_level: Optional[int] = None
        if self.verbose:
            self._previous_level = LOG.level
            LOG.setLevel(logging.DEBUG)
        self._sessions = WorkerSessions(
            self.plan,
            self._sink,
            self._label,
            forwarder=self._forwarder,
            retain_working_dir=self.retain_working_dir,
        )

    async def teardown(self, worker: Worker) -> None:
        # Normally close_job has ended the Sessions already, and this close does nothing.
        await asyncio.get_running_loop().run_in_executor(None, self.close)
        LOG.removeHandler(self._forwarder)
        if self._previous_level is not None:
            LOG.setLevel(self._previous_level)
        self._sink.close()

    def run_task(self, task: TaskSpec) -> TaskOutcome:
        try:
            return self._sessions.run_task(task)
        finally:
            self._sink.flush()

    def stop(self, cancel_running: bool, immediate: bool) -> list[str]:
        running = self._sessions.stop(cancel_running=cancel_running, immediate=immediate)
        self._sink.flush()
        return running

    def close(self, flush_token: Optional[str] = None) -> CloseReport:
        report = self._sessions.close()
        if flush_token is not None:
            self._sink.send_marker(flush_token, self._label)
        self._sink.flush()
        return report


def run_task(plugin_name: str, task: TaskSpec) -> TaskOutcome:
    """Dask task function: run ``task`` in a Session of the job's plugin on this worker."""
    return _plugin(get_worker(), plugin_name).run_task(task)


async def stop_job(plugin_name: str, cancel_running: bool, immediate: bool, dask_worker: Worker) -> list[str]:
    """``Client.run`` function: stop the job on this worker and return its running task ids."""
    plugin = dask_worker.plugins.get(plugin_name)
    if not isinstance(plugin, SessionsPlugin):
        return []
    return await asyncio.get_running_loop().run_in_executor(None, plugin.stop, cancel_running, immediate)


async def close_job(plugin_name: str, flush_token: str, dask_worker: Worker) -> Optional[CloseReport]:
    """``Client.run`` function: end the job's Sessions on this worker, or return ``None``
    when the worker never set up the plugin."""
    plugin = dask_worker.plugins.get(plugin_name)
    if not isinstance(plugin, SessionsPlugin):
        return None
    return await asyncio.get_running_loop().run_in_executor(None, plugin.close, flush_token)


def _plugin(worker: Worker, plugin_name: str) -> SessionsPlugin:
    plugin = worker.plugins.get(plugin_name)
    if not isinstance(plugin, SessionsPlugin):
        raise RuntimeError(
            f"Worker {worker.address} has no plugin {plugin_name!r}; the runner registers it before it "
            "submits tasks, so the job on this worker has already ended."
        )
    return plugin


def _leave_process_group() -> None:
    try:
        os.setpgid(0, 0)
    except OSError:
        pass  # a session leader cannot change its group, and needs no change


class _TopicSink:
    """Event sink that sends events in batches, from a thread of its own and on ``flush``."""

    def __init__(self, send: Callable[[list[dict[str, Any]]], None]) -> None:
        self._send = send
        self._lock = threading.Lock()
        # Held while a batch is taken and sent, so that batches leave in order.
        self._send_lock = threading.Lock()
        self._buffer: list[dict[str, Any]] = []
        self._closed = threading.Event()
        self._thread = threading.Thread(target=self._run, name="openjd-sessions-events", daemon=True)
        self._thread.start()

    def emit(self, event: Event) -> None:
        if not isinstance(event, (ActionEvent, LogEvent, SessionEvent)):
            return  # step events come from the runner, never from a worker
        wire = event_to_wire(event)
        with self._lock:
            self._buffer.append(wire)
            full = len(self._buffer) >= _MAX_BATCH
        if full:
            self.flush()

    def send_marker(self, token: str, worker: str) -> None:
        """Queue the marker after which the runner receives no more events of ``worker``."""
        with self._lock:
            self._buffer.append({WIRE_FLUSH_KEY: token, "worker": worker})

    def flush(self) -> None:
        with self._send_lock:
            with self._lock:
                batch, self._buffer = self._buffer, []
            if batch:
                self._send(batch)

    def close(self) -> None:
        self._closed.set()
        self._thread.join()
        self.flush()

    def _run(self) -> None:
        while not self._closed.wait(_FLUSH_PERIOD_SECONDS):
            self.flush()
