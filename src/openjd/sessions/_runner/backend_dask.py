"""``DaskBackend``: run the tasks on the workers of a Dask cluster.

Each task is one Dask task with a key of its own that calls ``dask_worker.run_task``.
A worker plugin registered for the job keeps each worker's Sessions (see
``worker_sessions``), and the workers send their events to this process through Dask's
event topics, each message marked with the job's id. The runner takes each result as it
arrives and releases it at once, so Dask never reruns a task whose result it would
otherwise keep on a worker that is lost.

Delivery is at least once: when a worker is lost while it runs a task, the scheduler
runs the task again on another worker, after up to ``distributed.scheduler.allowed-failures``
lost workers (3 by default), and the log reports each rerun.

This module imports ``distributed`` only inside ``DaskBackend`` methods, so that the
command runs without the ``dask`` extra as long as no cluster option is given.
"""

from __future__ import annotations

import importlib
import queue
import threading
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Optional, Union

from .backend import Backend, CloseReport, TaskOutcome, TaskSpec
from .events import WIRE_FLUSH_KEY, Event, EventSink, LogEvent, event_from_wire
from .plan import JobPlan, PlanError

__all__ = ("ClusterTarget", "DaskBackend", "parse_cluster_option")

DASK_EXTRA_HINT = "pip install 'openjd-sessions[dask]'"
EVENT_TOPIC = "openjd-sessions"
"""Dask event topic of every job. The scheduler keeps the latest events of each topic
(``distributed.admin.low-level-log-length``, 1000 by default), so one topic for all jobs
keeps that memory bounded. Each message names its job."""
# How long ``close`` waits for the last events of the workers after they ended their Sessions.
_FLUSH_WAIT_SECONDS = 10.0
# How long a capacity value is reused before the scheduler is asked again.
_CAPACITY_TTL_SECONDS = 1.0


@dataclass(frozen=True)
class ClusterTarget:
    """Target cluster: a local cluster of N workers, a scheduler address or a scheduler file."""

    local_workers: Optional[int] = None
    address: Optional[str] = None
    scheduler_file: Optional[Path] = None


def parse_cluster_option(cluster: Optional[str], scheduler_file: Optional[Path]) -> ClusterTarget:
    """Check ``--cluster`` or ``--scheduler-file`` and that Dask is installed.

    Raises:
        PlanError: the value is invalid, the scheduler file is missing, or ``distributed``
            cannot be imported.
    """
    if scheduler_file is not None:
        if not scheduler_file.is_file():
            raise PlanError(f"The Dask scheduler file {scheduler_file} was not found. Check the path.")
        target = ClusterTarget(scheduler_file=scheduler_file)
    else:
        target = _parse_cluster_value(cluster or "")
    option = "--scheduler-file" if scheduler_file is not None else "--cluster"
    try:
        import distributed  # noqa: F401
    except ImportError as exc:
        raise PlanError(
            f"{option} needs the Python package 'distributed', which cannot be imported ({exc}). "
            f"Install the dask extra: {DASK_EXTRA_HINT}"
        ) from exc
    return target


def _parse_cluster_value(value: str) -> ClusterTarget:
    if value.startswith("local:"):
        count = value[len("local:") :]
        if not count.isdigit() or int(count) < 1:
            raise PlanError(
                f"Invalid --cluster value {value!r}: local:N needs a worker count of 1 or more, for example local:4."
            )
        return ClusterTarget(local_workers=int(count))
    scheme, separator, rest = value.partition("://")
    host, colon, port = rest.rpartition(":")
    if separator and scheme in ("tcp", "tls") and host and colon and port.isdigit():
        return ClusterTarget(address=value)
    raise PlanError(
        f"Invalid --cluster value {value!r}: expected local:N, tcp://HOST:PORT or tls://HOST:PORT, "
        "for example --cluster local:4 or --cluster tls://scheduler.example.com:8786."
    )


class DaskBackend(Backend):
    """Run tasks as Dask tasks, in Sessions that a worker plugin keeps on each worker."""

    def __init__(self, target: ClusterTarget, *, retain_working_dir: bool = False, verbose: bool = False) -> None:
        self._target = target
        self._retain_working_dir = retain_working_dir
        self._verbose = verbose
        job_id = uuid.uuid4().hex[:12]
        self._job_id = job_id
        self._plugin_name = f"openjd-sessions-{job_id}"
        self._key_prefix = f"openjd-{job_id}"
        # Objects of the partly typed ``distributed`` package: a LocalCluster and a Client.
        self._cluster: Any = None
        self._client: Any = None
        self._events: Optional[EventSink] = None
        self._lock = threading.Lock()
        # Futures without a handled result, by key, with their tasks.
        self._futures: dict[str, tuple[Any, TaskSpec]] = {}
        self._stopping = False
        # Events and outcomes in arrival order, handled on the runner's thread.
        self._inbox: queue.Queue[Union[Event, TaskOutcome, _LostTasks, _Flushed]] = queue.Queue()
        self._flushed: set[str] = set()
        self._capacity = (0.0, 1)

    def start(self, plan: JobPlan, events: EventSink) -> list[str]:
        from .dask_worker import SessionsPlugin

        distributed: Any = importlib.import_module("distributed")
        self._events = events
        if self._target.local_workers is not None:
            # Every server of the cluster listens on 127.0.0.1 only. The HTTP servers need an
            # explicit address, because distributed 2024.1 binds a worker's to every interface
            # when its dashboard address is None.
            self._cluster = distributed.LocalCluster(
                n_workers=self._target.local_workers,
                threads_per_worker=1,
                processes=True,
                host="127.0.0.1",
                dashboard_address="127.0.0.1:0",
                worker_dashboard_address="127.0.0.1:0",
            )
            client = distributed.Client(self._cluster)
        else:
            client = self._connect(distributed)
        with self._lock:
            self._client = client

        client.subscribe_topic(EVENT_TOPIC, self._on_worker_events)
        client.subscribe_topic("all", self._on_cluster_event)
        plugin = SessionsPlugin(
            plan,
            self._job_id,
            retain_working_dir=self._retain_working_dir,
            verbose=self._verbose,
            own_process_group=self._cluster is not None,
        )
        client.register_plugin(plugin, name=self._plugin_name)
        return []

    def _connect(self, distributed: Any) -> Any:
        where = self._target.address or f"the address in {self._target.scheduler_file}"
        try:
            if self._target.address is not None:
                return distributed.Client(self._target.address)
            return distributed.Client(scheduler_file=str(self._target.scheduler_file))
        except (OSError, TypeError, ValueError) as exc:
            # Dask raises TypeError when a tls:// address comes without a client certificate.
            raise OSError(
                f"cannot connect to the Dask scheduler at {where}: {exc}. Check that the scheduler "
                "runs and that this host can reach it. For tls://, set the CA file, client certificate "
                "and key in the Dask configuration (distributed.comm.tls)."
            ) from exc

    def capacity(self) -> int:
        checked, threads = self._capacity
        client = self._client
        if client is None or time.monotonic() - checked < _CAPACITY_TTL_SECONDS:
            return threads
        try:
            threads = max(1, sum(int(count) for count in client.nthreads().values()))
        except OSError as exc:
            self._report("WARNING", f"Could not read the worker count from the Dask scheduler: {exc}")
        self._capacity = (time.monotonic(), threads)
        return threads

    def submit(self, tasks: Sequence[TaskSpec]) -> None:
        from .dask_worker import run_task

        client = self._require_client()
        keys = [f"{self._key_prefix}-{task.step_index}-{task.task_index}" for task in tasks]
        with self._lock:
            if self._stopping:
                for task in tasks:
                    self._inbox.put(TaskOutcome(task_id=task.task_id, state=None))
                return
            futures = client.map(run_task, [self._plugin_name] * len(tasks), tasks, key=keys, pure=False)
            for future, task in zip(futures, tasks):
                self._futures[str(future.key)] = (future, task)
        for future in futures:
            future.add_done_callback(self._on_done)

    def next_outcome(self, timeout: float) -> Optional[TaskOutcome]:
        deadline = time.monotonic() + timeout
        while True:
            remaining = deadline - time.monotonic()
            try:
                item = self._inbox.get(timeout=max(remaining, 0.0))
            except queue.Empty:
                return None
            if isinstance(item, TaskOutcome):
                return item
            self._handle(item)

    def end_step(self, step_index: int) -> list[str]:
        # A worker keeps its Sessions with their step environments until close().
        return []

    def stop(self, *, cancel_running: bool, immediate: bool = False) -> None:
        from .dask_worker import stop_job

        with self._lock:
            self._stopping = True
            client = self._client
        if client is None:
            return
        try:
            replies = client.run(stop_job, self._plugin_name, cancel_running, immediate, on_error="return")
            running = set()
            for address, reply in replies.items():
                if isinstance(reply, list):
                    running.update(reply)
                else:
                    self._report("ERROR", f"Could not stop the job on worker {address}: {reply!r}", address)
            with self._lock:
                waiting = [future for future, task in self._futures.values() if task.task_id not in running]
            # A task that starts after stop_job returned finds the job stopped and does not run,
            # so every task that is not running now can be dropped.
            pending = [future for future in waiting if future.status == "pending"]
            if pending:
                client.cancel(pending)
        except OSError as exc:
            self._report("ERROR", f"Could not stop the job on the Dask cluster: {exc}")

    def close(self) -> CloseReport:
        from .dask_worker import close_job

        report = CloseReport()
        client = self._client
        try:
            if client is not None:
                with self._lock:
                    leftover = [future for future, _ in self._futures.values()]
                if leftover:
                    client.cancel(leftover)
                token = uuid.uuid4().hex
                replies = client.run(close_job, self._plugin_name, token, on_error="return")
                self._collect(replies, report)
                closed = [address for address, reply in replies.items() if isinstance(reply, CloseReport)]
                self._wait_for_markers(token, closed)
        finally:
            if client is not None:
                self._disconnect(client)
            self._drain()
            if self._cluster is not None:
                self._cluster.close()
        return report

    def _disconnect(self, client: Any) -> None:
        """Remove the job's plugin from the workers and close the client, reporting failures."""
        try:
            client.unregister_worker_plugin(self._plugin_name)
            client.unsubscribe_topic(EVENT_TOPIC)
            client.unsubscribe_topic("all")
        except Exception as exc:  # the job's work is done; only cleanup on the cluster failed
            self._report("WARNING", f"Could not remove plugin {self._plugin_name} from the workers: {exc!r}")
        client.close()

    def _report(self, level: str, message: str, worker: Optional[str] = None) -> None:
        """Queue a message of the runner itself for the output."""
        self._inbox.put(LogEvent(session_id=None, level=level, message=message, time=time.time(), worker=worker))

    def _collect(self, replies: dict[str, Any], report: CloseReport) -> None:
        for address, reply in replies.items():
            if isinstance(reply, CloseReport):
                report.job_environment_failures.extend(reply.job_environment_failures)
                for step, failures in reply.step_environment_failures.items():
                    report.step_environment_failures.setdefault(step, []).extend(failures)
            elif isinstance(reply, BaseException):
                self._report("ERROR", f"Could not end the Sessions of the job on worker {address}: {reply!r}", address)

    def _wait_for_markers(self, token: str, workers: list[str]) -> None:
        """Handle the workers' events until each worker's flush marker has arrived."""
        markers = {f"{token}:{address}" for address in workers}
        deadline = time.monotonic() + _FLUSH_WAIT_SECONDS
        while not markers <= self._flushed:
            remaining = deadline - time.monotonic()
            if remaining <= 0:
                return
            try:
                item = self._inbox.get(timeout=remaining)
            except queue.Empty:
                return
            if not isinstance(item, TaskOutcome):
                self._handle(item)

    def _drain(self) -> None:
        while True:
            try:
                item = self._inbox.get_nowait()
            except queue.Empty:
                return
            if not isinstance(item, TaskOutcome):
                self._handle(item)

    def _handle(self, item: Union[Event, _LostTasks, _Flushed]) -> None:
        if isinstance(item, _Flushed):
            self._flushed.add(item.marker)
        elif isinstance(item, _LostTasks):
            self._handle_lost(item)
        elif self._events is not None:
            self._events.emit(item)

    def _handle_lost(self, lost: _LostTasks) -> None:
        with self._lock:
            entries = [self._futures[key] for key in lost.keys if key in self._futures]
            stopping = self._stopping
        for _, task in entries:
            action = "It is not run again, because the job is stopping." if stopping else "Dask runs it again."
            self._handle(
                LogEvent(
                    session_id=None,
                    level="WARNING",
                    message=f"Worker {lost.worker} was lost while running task {task.task_id}. {action}",
                    time=time.time(),
                    worker=lost.worker,
                    task_id=task.task_id,
                )
            )
        # NOTE: Dask may already have given the task to a worker that joined after the stop
        # and so never learned of it. There the task can still run before this cancel arrives.
        if stopping and entries and self._client is not None:
            self._client.cancel([future for future, _ in entries])

    # The callbacks below run on threads of the Dask client. They only queue what they got.

    def _on_worker_events(self, event: tuple[float, Any]) -> None:
        _, message = event
        if not isinstance(message, dict) or message.get("job") != self._job_id:
            return  # another job on the same cluster
        for data in message.get("events", ()):
            if WIRE_FLUSH_KEY in data:
                self._inbox.put(_Flushed(f"{data[WIRE_FLUSH_KEY]}:{data.get('worker')}"))
            else:
                self._inbox.put(event_from_wire(data))

    def _on_cluster_event(self, event: tuple[float, Any]) -> None:
        _, message = event
        if not isinstance(message, dict) or message.get("action") != "remove-worker":
            return
        keys = [str(key) for key in message.get("processing-tasks", ()) if str(key).startswith(self._key_prefix)]
        if keys:
            self._inbox.put(_LostTasks(worker=str(message.get("worker")), keys=keys))

    def _on_done(self, future: Any) -> None:
        with self._lock:
            entry = self._futures.pop(str(future.key), None)
        if entry is None:
            return
        task = entry[1]
        outcome: TaskOutcome
        if future.status == "finished":
            outcome = future.result()
        elif future.status == "cancelled":
            outcome = TaskOutcome(task_id=task.task_id, state=None)
        else:
            message = f"Task {task.task_id} failed in Dask: {future.exception()}"
            outcome = TaskOutcome(task_id=task.task_id, state=None, message=message)
        future.release()
        self._inbox.put(outcome)

    def _require_client(self) -> Any:
        if self._client is None:
            raise RuntimeError("DaskBackend.start() must be called before tasks are submitted.")
        return self._client


@dataclass(frozen=True)
class _Flushed:
    """A worker's flush marker: ``<token>:<worker address>``."""

    marker: str


@dataclass(frozen=True)
class _LostTasks:
    """Tasks of this job that a removed worker was running, by Dask key."""

    worker: str
    keys: list[str]
