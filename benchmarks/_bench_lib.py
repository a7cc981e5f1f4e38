"""Workloads that drive a Session through the public ``openjd.sessions`` API only.

The same code runs against upstream openjd-sessions 0.10.8 and against this package, and
the venv that runs it decides which one is imported.
"""

from __future__ import annotations

import logging
import statistics
import threading
import time
from pathlib import Path
from typing import Any, Optional

from _bench_common import (
    ACTION_TIMEOUT_S,
    SECRET,
    SECRET_VARIABLE,
    CountingHandler,
    PeakRssMeter,
    base_python,
    cpu_split,
    cpu_usage,
    producer_snippet,
    summarize_latencies,
    sync_filesystems,
)
from _bench_config import Sizes
from openjd.model import (
    RevisionExtensions,
    SpecificationRevision,
    create_job,
    decode_job_template,
)

from openjd.sessions import LOG, ActionState, ActionStatus, Session

Result = dict[str, Any]

# Exits 0 on SIGTERM, after printing "ready" once its handler is installed.
_GRACEFUL_CHILD = (
    "import signal,sys,time;"
    "signal.signal(signal.SIGTERM,lambda *a:sys.exit(0));"
    "print('ready',flush=True);time.sleep(60)"
)


class ActionWaiter:
    """Session callback that records when each action reaches a terminal state."""

    def __init__(self) -> None:
        self._done = threading.Event()
        self.finished_at = 0.0
        self.status: Optional[ActionStatus] = None

    def callback(self, session_id: str, status: ActionStatus) -> None:
        if status.state != ActionState.RUNNING:
            self.finished_at = time.perf_counter()
            self.status = status
            self._done.set()

    def arm(self) -> None:
        self._done.clear()
        self.status = None

    def wait(self, what: str) -> ActionStatus:
        if not self._done.wait(ACTION_TIMEOUT_S):
            raise RuntimeError(f"{what} did not reach a terminal state within {ACTION_TIMEOUT_S} s")
        assert self.status is not None
        return self.status


def _job_template(step_action: dict[str, Any], environment: Optional[dict[str, Any]]) -> Any:
    template: dict[str, Any] = {
        "specificationVersion": "jobtemplate-2023-09",
        "name": "bench",
        "steps": [{"name": "Step", "script": {"actions": {"onRun": step_action}}}],
    }
    if environment is not None:
        template["jobEnvironments"] = [environment]
    decoded = decode_job_template(template=template, supported_extensions=["REDACTED_ENV_VARS"])
    return create_job(job_template=decoded, job_parameter_values={})


def step_script(command: str, args: Optional[list[str]] = None, **action: Any) -> Any:
    action = {"command": command, **action}
    if args:
        action["args"] = args
    job = _job_template(action, None)
    return job.steps[0].script


def environment(on_enter: dict[str, Any], on_exit: Optional[dict[str, Any]] = None) -> Any:
    actions = {"onEnter": on_enter}
    if on_exit is not None:
        actions["onExit"] = on_exit
    job = _job_template({"command": "/bin/true"}, {"name": "Env", "script": {"actions": actions}})
    return job.jobEnvironments[0]


def new_session(root: Path, waiter: ActionWaiter, redaction: bool = False) -> Session:
    extensions = ["REDACTED_ENV_VARS"] if redaction else []
    return Session(
        session_id="bench",
        job_parameter_values={},
        callback=waiter.callback,
        session_root_directory=root,
        revision_extensions=RevisionExtensions(
            spec_rev=SpecificationRevision.v2023_09, supported_extensions=extensions
        ),
    )


def _expect(status: ActionStatus, state: ActionState, what: str) -> None:
    if status.state != state:
        raise RuntimeError(
            f"{what} ended {status.state.value} (exit code {status.exit_code},"
            f" fail message {status.fail_message!r}); the workload expects {state.value}"
        )


def _run_and_wait(session: Session, waiter: ActionWaiter, script: Any, what: str) -> float:
    waiter.arm()
    started = time.perf_counter()
    session.run_task(step_script=script, task_parameter_values={})
    _expect(waiter.wait(what), ActionState.SUCCESS, what)
    return waiter.finished_at - started


def session_create(root: Path, sizes: Sizes, variant: str) -> Result:
    waiter = ActionWaiter()
    sync_filesystems()
    latencies = []
    cpu_started, wall_started = time.process_time(), time.perf_counter()
    for _ in range(sizes.session_creates):
        started = time.perf_counter()
        session = new_session(root, waiter)
        session.cleanup()
        latencies.append(time.perf_counter() - started)
    cpu_s, wall_s = time.process_time() - cpu_started, time.perf_counter() - wall_started
    summary = summarize_latencies(latencies, wall_s)
    return {
        "median_ms": summary.median_ms,
        "p95_ms": summary.p95_ms,
        "cpu_ms_per_session": cpu_s * 1000.0 / len(latencies),
    }


def _task_loop(root: Path, count: int, script: Any) -> Result:
    waiter = ActionWaiter()
    session = new_session(root, waiter)
    try:
        _run_and_wait(session, waiter, script, "warm-up task")
        sync_filesystems()
        latencies = []
        cpu_started, wall_started = time.process_time(), time.perf_counter()
        for index in range(count):
            latencies.append(_run_and_wait(session, waiter, script, f"task {index}"))
        cpu_s, wall_s = time.process_time() - cpu_started, time.perf_counter() - wall_started
    finally:
        session.cleanup()
    summary = summarize_latencies(latencies, wall_s)
    return {
        "median_ms": summary.median_ms,
        "p95_ms": summary.p95_ms,
        "tasks_per_s": summary.per_second,
        "cpu_ms_per_task": cpu_s * 1000.0 / count,
    }


def task_overhead(root: Path, sizes: Sizes, variant: str) -> Result:
    return _task_loop(root, sizes.tasks, step_script("/bin/true"))


def python_task_overhead(root: Path, sizes: Sizes, variant: str) -> Result:
    return _task_loop(root, sizes.tasks, step_script(base_python(), ["-c", "pass"]))


def env_enter_exit(root: Path, sizes: Sizes, variant: str) -> Result:
    env = environment({"command": "/bin/true"}, {"command": "/bin/true"})
    waiter = ActionWaiter()
    session = new_session(root, waiter)
    try:
        sync_filesystems()
        latencies = []
        cpu_started, wall_started = time.process_time(), time.perf_counter()
        for index in range(sizes.environment_pairs):
            waiter.arm()
            started = time.perf_counter()
            identifier = session.enter_environment(environment=env)
            _expect(waiter.wait(f"enter {index}"), ActionState.SUCCESS, f"enter {index}")
            waiter.arm()
            session.exit_environment(identifier=identifier, keep_session_running=True)
            _expect(waiter.wait(f"exit {index}"), ActionState.SUCCESS, f"exit {index}")
            latencies.append(waiter.finished_at - started)
        cpu_s, wall_s = time.process_time() - cpu_started, time.perf_counter() - wall_started
    finally:
        session.cleanup()
    summary = summarize_latencies(latencies, wall_s)
    return {
        "median_ms": summary.median_ms,
        "p95_ms": summary.p95_ms,
        "pairs_per_s": summary.per_second,
        "cpu_ms_per_pair": cpu_s * 1000.0 / len(latencies),
    }


def _producer(count: int, mode: str) -> Any:
    return step_script(base_python(), ["-c", producer_snippet(), str(count), mode, SECRET])


def _enter_secret_environment(session: Session, waiter: ActionWaiter) -> None:
    line = f"openjd_redacted_env: {SECRET_VARIABLE}={SECRET}"
    waiter.arm()
    session.enter_environment(environment=environment({"command": "/bin/echo", "args": [line]}))
    _expect(waiter.wait("secret environment"), ActionState.SUCCESS, "secret environment")


def output_throughput(root: Path, sizes: Sizes, variant: str) -> Result:
    redaction = variant == "redaction"
    count = sizes.output_lines
    script = _producer(count, variant)
    waiter = ActionWaiter()
    handler = CountingHandler(check_secret=redaction)
    LOG.addHandler(handler)
    session = new_session(root, waiter, redaction=redaction)

    try:
        if redaction:
            _enter_secret_environment(session, waiter)
        _run_and_wait(session, waiter, _producer(100, "plain"), "warm-up task")
        handler.lines = 0
        sync_filesystems()
        cpu_started = time.process_time()
        wall_s = _run_and_wait(session, waiter, script, "output task")
        cpu_s = time.process_time() - cpu_started
    finally:
        session.cleanup()
        LOG.removeHandler(handler)

    result: Result = {"lines_per_s": count / wall_s, "cpu_us_per_line": cpu_s * 1e6 / count}
    problems = []
    if handler.lines != count:
        problems.append(f"the handler counted {handler.lines} of {count} output lines")
    if handler.leaked_secrets:
        problems.append(f"{handler.leaked_secrets} records contained the secret unredacted")
    if problems:
        result["problems"] = problems
    return result


def cancel_latency(root: Path, sizes: Sizes, variant: str) -> Result:
    ready = threading.Event()

    class ReadyHandler(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if record.msg == "ready":
                ready.set()

    if variant == "terminate":
        script = step_script("sleep", ["60"])
    else:
        cancelation = {"mode": "NOTIFY_THEN_TERMINATE", "notifyPeriodInSeconds": 30}
        script = step_script(base_python(), ["-c", _GRACEFUL_CHILD], cancelation=cancelation)
    handler = ReadyHandler()
    LOG.addHandler(handler)
    latencies = []
    try:
        sync_filesystems()
        for index in range(sizes.cancels):
            waiter = ActionWaiter()
            session = new_session(root, waiter)
            try:
                ready.clear()
                session.run_task(step_script=script, task_parameter_values={})
                if variant == "terminate":
                    time.sleep(0.05)
                elif not ready.wait(ACTION_TIMEOUT_S):
                    raise RuntimeError(f"the child did not print 'ready' within {ACTION_TIMEOUT_S} s")
                started = time.perf_counter()
                session.cancel_action()
                _expect(waiter.wait(f"cancel {index}"), ActionState.CANCELED, f"cancel {index}")
                latencies.append(waiter.finished_at - started)
            finally:
                session.cleanup()
    finally:
        LOG.removeHandler(handler)
    return {
        "median_ms": statistics.median(latencies) * 1000.0,
        "max_ms": max(latencies) * 1000.0,
    }


def concurrency(root: Path, sizes: Sizes, variant: str) -> Result:
    session_count = int(variant)
    per_session = sizes.lines_per_concurrent_session
    handler = CountingHandler()
    LOG.addHandler(handler)
    waiters = [ActionWaiter() for _ in range(session_count)]
    sessions = [new_session(root, waiter) for waiter in waiters]
    script = _producer(per_session, "plain")
    errors: list[str] = []
    barrier = threading.Barrier(session_count + 1)

    def run_one(session: Session, waiter: ActionWaiter) -> None:
        barrier.wait()
        try:
            _run_and_wait(session, waiter, script, "concurrent output task")
        except Exception as exc:  # reported with the results, not as a thread traceback
            errors.append(str(exc))

    threads = [
        threading.Thread(target=run_one, args=(session, waiter))
        for session, waiter in zip(sessions, waiters)
    ]
    try:
        sync_filesystems()
        for thread in threads:
            thread.start()
        barrier.wait()
        usage_started, wall_started = cpu_usage(), time.perf_counter()
        for thread in threads:
            thread.join()
        usage_ended, wall_s = cpu_usage(), time.perf_counter() - wall_started
    finally:
        for session in sessions:
            session.cleanup()
        LOG.removeHandler(handler)
    total = session_count * per_session
    result: Result = {**cpu_split(usage_started, usage_ended, total), "lines_per_s": total / wall_s}
    problems = errors[:3]
    if handler.lines != total:
        problems.append(f"the handler counted {handler.lines} of {total} output lines")
    if problems:
        result["problems"] = problems
    return result


def _memory_script(sizes: Sizes, variant: str) -> Any:
    if variant == "lines":
        return _producer(sizes.memory_lines, "plain")
    if variant == "bytes":
        # 4 KiB lines keep the number of records low, so a 1 GiB run stays short.
        command = f"yes {'y' * 4095} | head -c {sizes.memory_bytes}"
    else:
        command = f"head -c {sizes.memory_line_bytes} /dev/zero | tr '\\000' a; echo"
    return step_script("/bin/sh", ["-c", command])


def memory(root: Path, sizes: Sizes, variant: str) -> Result:
    waiter = ActionWaiter()
    handler = CountingHandler()
    LOG.addHandler(handler)
    meter = PeakRssMeter()
    session = new_session(root, waiter)
    try:
        _run_and_wait(session, waiter, _producer(100, "plain"), "warm-up task")
        script = _memory_script(sizes, variant)
        handler.lines = handler.records = 0
        sync_filesystems()
        meter.start()
        wall_s = _run_and_wait(session, waiter, script, f"memory task {variant}")
        growth_mib = meter.stop_mib()
    finally:
        session.cleanup()
        LOG.removeHandler(handler)
    result: Result = {"rss_growth_mib": growth_mib, "wall_s": wall_s}
    expected = _expected_memory_records(sizes, variant)
    counted = handler.lines if variant == "lines" else handler.records
    if counted < expected:
        result["problems"] = [f"the handler saw {counted} records, expected at least {expected}"]
    return result


def _expected_memory_records(sizes: Sizes, variant: str) -> int:
    if variant == "lines":
        return sizes.memory_lines
    if variant == "bytes":
        return sizes.memory_bytes // 4096
    # The library splits a long line into pieces of at most 64,000 characters.
    return sizes.memory_line_bytes // 64_000


WORKLOADS = {
    "session_create": session_create,
    "task_overhead": task_overhead,
    "python_task_overhead": python_task_overhead,
    "env_enter_exit": env_enter_exit,
    "output_throughput": output_throughput,
    "cancel_latency": cancel_latency,
    "concurrency": concurrency,
    "memory": memory,
}
