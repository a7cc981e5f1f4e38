"""``LocalBackend``: N Sessions on N threads of this process.

Each worker thread owns one Session for the whole job. It enters the job environments
once when the backend starts, and exits them in reverse order when the backend closes.
It enters a step's environments before its first task of that step, keeps taking tasks
of that step while the step has queued tasks, and exits the step's environments as soon
as the step has none left. Then it moves on to the next step with queued tasks. With one
worker, the actions run in exactly the order of a single-Session run.
"""

from __future__ import annotations

import queue
import threading
import time
from collections import deque
from collections.abc import Sequence
from pathlib import Path
from typing import Optional, Union

from openjd.sessions import LOG

from .backend import Backend, CloseReport, TaskOutcome, TaskSpec
from .driver import EnteredEnvironment, LogForwarder, SessionDriver
from .events import EventSink
from .plan import JobPlan

__all__ = ("LocalBackend",)


class LocalBackend(Backend):
    """Run tasks in ``workers`` Sessions on threads of this process."""

    def __init__(
        self,
        *,
        workers: int = 1,
        retain_working_dir: bool = False,
        session_root_directory: Optional[Path] = None,
    ) -> None:
        if workers < 1:
            raise ValueError(f"workers is {workers}; a LocalBackend needs at least 1 worker.")
        self._worker_count = workers
        self._retain_working_dir = retain_working_dir
        self._session_root_directory = session_root_directory
        self._queues = _StepQueues()
        self._outcomes: queue.Queue[TaskOutcome] = queue.Queue()
        self._workers: list[_LocalWorker] = []
        self._forwarder: Optional[LogForwarder] = None
        # Steps whose environments a worker has entered, by step index, and the exit failures
        # of steps that workers released. The condition guards both and the stop flags.
        self._condition = threading.Condition()
        self._holders: dict[int, set[str]] = {}
        self._exit_failures: dict[int, list[str]] = {}
        self._stopped = False
        self._cancel: Optional[bool] = None  # None, or the ``immediate`` flag of the last cancel

    def start(self, plan: JobPlan, events: EventSink) -> list[str]:
        self._forwarder = LogForwarder(events)
        LOG.addHandler(self._forwarder)
        for number in range(1, self._worker_count + 1):
            worker = _LocalWorker(self, plan, events, f"local-{number}")
            self._workers.append(worker)
            worker.start()

        failures: list[str] = []
        for worker in self._workers:
            worker.opened.wait()
            if worker.error is not None:
                raise worker.error
            failures.extend(self.describe(failure, worker.worker_name) for failure in worker.job_enter_failures)
        return failures

    def capacity(self) -> int:
        return self._worker_count

    def submit(self, tasks: Sequence[TaskSpec]) -> None:
        with self._condition:
            stopped = self._stopped
        if stopped:
            for task in tasks:
                self._outcomes.put(TaskOutcome(task_id=task.task_id, state=None))
            return
        self._queues.put(tasks)

    def next_outcome(self, timeout: float) -> Optional[TaskOutcome]:
        try:
            return self._outcomes.get(timeout=timeout)
        except queue.Empty:
            return None

    def end_step(self, step_index: int) -> list[str]:
        with self._condition:
            while self._holders.get(step_index):
                self._condition.wait()
            return self._exit_failures.pop(step_index, [])

    def stop(self, *, cancel_running: bool, immediate: bool = False) -> None:
        with self._condition:
            self._stopped = True
            if cancel_running:
                self._cancel = immediate or bool(self._cancel)
        for task in self._queues.clear():
            self._outcomes.put(TaskOutcome(task_id=task.task_id, state=None))
        if cancel_running:
            for worker in list(self._workers):
                worker.driver.cancel(immediate=immediate)

    def close(self) -> CloseReport:
        self._queues.close()
        report = CloseReport()
        for worker in self._workers:
            worker.join()
            name = worker.worker_name
            report.job_environment_failures.extend(self.describe(item, name) for item in worker.exit_failures)
            for step_name, failures in worker.step_exit_failures.items():
                described = [self.describe(item, name) for item in failures]
                report.step_environment_failures.setdefault(step_name, []).extend(described)
        if self._forwarder is not None:
            LOG.removeHandler(self._forwarder)
        return report

    @property
    def stopped(self) -> bool:
        return self._stopped

    @property
    def cancel_request(self) -> Optional[bool]:
        """``None`` without a cancel, else whether the last cancel requested termination at once."""
        return self._cancel

    def describe(self, failure: str, worker: str) -> str:
        """Add the worker to an environment failure when there is more than one worker."""
        return failure if self._worker_count == 1 else f"{failure} on {worker}"

    def hold_step(self, step_index: int, worker: str) -> None:
        with self._condition:
            self._holders.setdefault(step_index, set()).add(worker)

    def release_step(self, step_index: int, worker: str, failures: list[str]) -> None:
        with self._condition:
            self._holders.get(step_index, set()).discard(worker)
            self._exit_failures.setdefault(step_index, []).extend(self.describe(item, worker) for item in failures)
            self._condition.notify_all()

    def put_outcome(self, outcome: TaskOutcome) -> None:
        self._outcomes.put(outcome)

    def take(self, current_step: Optional[int]) -> Union[TaskSpec, _Drained, _Closed]:
        return self._queues.take(current_step)

    def open_session(self, driver: SessionDriver, plan: JobPlan) -> None:
        driver.open_session(
            plan,
            retain_working_dir=self._retain_working_dir,
            session_root_directory=self._session_root_directory,
            forwarder=self._forwarder,
        )


class _Drained:
    """``_StepQueues.take`` result: the worker's current step has no queued task left."""


class _Closed:
    """``_StepQueues.take`` result: the backend is closing, so the worker ends."""


_DRAINED = _Drained()
_CLOSED = _Closed()


class _StepQueues:
    """Queued tasks by step. Workers prefer the step whose environments they have entered."""

    def __init__(self) -> None:
        self._condition = threading.Condition()
        self._queues: dict[int, deque[TaskSpec]] = {}
        self._closed = False

    def put(self, tasks: Sequence[TaskSpec]) -> None:
        with self._condition:
            for task in tasks:
                self._queues.setdefault(task.step_index, deque()).append(task)
            self._condition.notify_all()

    def take(self, current_step: Optional[int]) -> Union[TaskSpec, _Drained, _Closed]:
        """Return the next task of ``current_step``, ``_DRAINED`` when it has none, or a task of
        the lowest step index with queued tasks. Block while there is nothing to return."""
        with self._condition:
            while True:
                if self._closed:
                    return _CLOSED
                if current_step is not None:
                    current = self._queues.get(current_step)
                    return current.popleft() if current else _DRAINED
                for step_index in sorted(self._queues):
                    if self._queues[step_index]:
                        return self._queues[step_index].popleft()
                self._condition.wait()

    def clear(self) -> list[TaskSpec]:
        """Remove and return every queued task."""
        with self._condition:
            dropped = [task for tasks in self._queues.values() for task in tasks]
            self._queues.clear()
            return dropped

    def close(self) -> None:
        with self._condition:
            self._closed = True
            self._condition.notify_all()


class _LocalWorker(threading.Thread):
    """One Session on its own thread, for the whole job."""

    def __init__(self, backend: LocalBackend, plan: JobPlan, events: EventSink, name: str) -> None:
        super().__init__(name=f"openjd-sessions-{name}", daemon=True)
        self.worker_name = name
        self._backend = backend
        self._plan = plan
        self.driver = SessionDriver(events, worker=name)
        self.opened = threading.Event()
        self.error: Optional[BaseException] = None
        self.job_enter_failures: list[str] = []
        self.exit_failures: list[str] = []
        self.step_exit_failures: dict[str, list[str]] = {}
        self._job_entered: list[EnteredEnvironment] = []
        self._step: Optional[int] = None
        self._step_entered: list[EnteredEnvironment] = []
        self._step_ready = False

    def run(self) -> None:
        try:
            self._open()
        except BaseException as exc:  # re-raised by LocalBackend.start on the runner's thread
            self.error = exc
        finally:
            self.opened.set()
        try:
            if self.error is None:
                self._work()
        finally:
            if self.driver.has_session:
                self._finish()

    def _open(self) -> None:
        self._backend.open_session(self.driver, self._plan)
        cancel = self._backend.cancel_request
        if cancel is not None:
            # A cancel that came before this worker was listed in the backend.
            self.driver.cancel(immediate=cancel)
        entering = self.driver.enter_environments(self._plan.environments, step=None)
        self._job_entered = entering.entered
        self.job_enter_failures = entering.failures

    def _work(self) -> None:
        while True:
            item = self._backend.take(self._step)
            if isinstance(item, _Closed):
                return
            if isinstance(item, _Drained):
                self._exit_step()
                continue
            try:
                outcome = self._run(item)
            except Exception as exc:
                # Report the task as failed so that the runner does not wait for it forever.
                message = f"Task {item.task_id} failed on {self.worker_name}: {type(exc).__name__}: {exc}"
                outcome = TaskOutcome(task_id=item.task_id, state=None, worker=self.worker_name, message=message)
            self._backend.put_outcome(outcome)

    def _run(self, task: TaskSpec) -> TaskOutcome:
        if self.job_enter_failures or self.driver.stopped or self._backend.stopped:
            return TaskOutcome(task_id=task.task_id, state=None, worker=self.worker_name)
        step = self._plan.steps[task.step_index]
        if self._step != task.step_index:
            if self._step is not None:
                self._exit_step()
            self._step = task.step_index
            self._backend.hold_step(task.step_index, self.worker_name)
            entering = self.driver.enter_environments(step.environments, step=step.name)
            self._step_entered = entering.entered
            self._step_ready = entering.complete
            if not entering.complete:
                failures = tuple(self._backend.describe(item, self.worker_name) for item in entering.failures)
                return TaskOutcome(
                    task_id=task.task_id, state=None, worker=self.worker_name, step_environment_failures=failures
                )
        if not self._step_ready:
            return TaskOutcome(task_id=task.task_id, state=None, worker=self.worker_name)

        started = time.monotonic()
        status = self.driver.run_task(step, task.parameters, task_id=task.task_id)
        duration = time.monotonic() - started
        state = status.state.value if status is not None else None
        return TaskOutcome(task_id=task.task_id, state=state, duration=duration, worker=self.worker_name)

    def _exit_step(self) -> None:
        if self._step is None:
            return
        step = self._plan.steps[self._step]
        failures = self.driver.exit_environments(self._step_entered, step=step.name, keep_session_running=True)
        self._backend.release_step(self._step, self.worker_name, failures)
        self._step = None
        self._step_entered = []

    def _finish(self) -> None:
        """Exit the step and job environments in reverse order, then end the Session."""
        if self._step is not None:
            step_name = self._plan.steps[self._step].name
            step_index = self._step
            failures = self.driver.exit_environments(self._step_entered, step=step_name, keep_session_running=True)
            self.step_exit_failures.setdefault(step_name, []).extend(failures)
            self._backend.release_step(step_index, self.worker_name, [])
            self._step = None
        self.exit_failures = self.driver.exit_environments(self._job_entered, step=None, keep_session_running=False)
        self.driver.close_session()
