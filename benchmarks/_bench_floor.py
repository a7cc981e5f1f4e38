"""Standard-library floors: the least work that any implementation of each workload does.

Each function mirrors the library workload of the same name and reports the same metric
names, so the driver can pair them. None of them imports ``openjd``.
"""

from __future__ import annotations

import logging
import os
import shutil
import signal
import statistics
import subprocess
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

from _bench_common import (
    SECRET,
    CountingHandler,
    PeakRssMeter,
    base_python,
    cpu_split,
    cpu_usage,
    output_line,
    producer_snippet,
    summarize_latencies,
    sync_filesystems,
)
from _bench_config import Sizes

Result = dict[str, Any]

# The value of LogContent.COMMAND_OUTPUT, so floor records carry the same attributes.
_COMMAND_OUTPUT = 8
_EXTRA = {"session_id": "bench", "openjd_log_content": _COMMAND_OUTPUT}


def _run_to_eof(command: list[str]) -> float:
    """Run ``command`` the way a session runs an action and return its latency in seconds."""
    started = time.perf_counter()
    process = subprocess.Popen(
        command,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=True,
    )
    assert process.stdout is not None
    with process.stdout:
        while process.stdout.read(65536):
            pass
    process.wait()
    return time.perf_counter() - started


def session_create(root: Path, sizes: Sizes, variant: str) -> Result:
    sync_filesystems()
    latencies = []
    cpu_started, wall_started = time.process_time(), time.perf_counter()
    for _ in range(sizes.session_creates):
        started = time.perf_counter()
        working_directory = tempfile.mkdtemp(dir=root, prefix="bench")
        tempfile.mkdtemp(dir=working_directory, prefix="embedded_files")
        shutil.rmtree(working_directory)
        latencies.append(time.perf_counter() - started)
    cpu_s, wall_s = time.process_time() - cpu_started, time.perf_counter() - wall_started
    summary = summarize_latencies(latencies, wall_s)
    return {
        "median_ms": summary.median_ms,
        "p95_ms": summary.p95_ms,
        "cpu_ms_per_session": cpu_s * 1000.0 / len(latencies),
    }


def _task_loop(count: int, command: list[str]) -> Result:
    _run_to_eof(command)
    sync_filesystems()
    cpu_started, wall_started = time.process_time(), time.perf_counter()
    latencies = [_run_to_eof(command) for _ in range(count)]
    cpu_s, wall_s = time.process_time() - cpu_started, time.perf_counter() - wall_started
    summary = summarize_latencies(latencies, wall_s)
    return {
        "median_ms": summary.median_ms,
        "p95_ms": summary.p95_ms,
        "tasks_per_s": summary.per_second,
        "cpu_ms_per_task": cpu_s * 1000.0 / count,
    }


def task_overhead(root: Path, sizes: Sizes, variant: str) -> Result:
    return _task_loop(sizes.tasks, ["/bin/true"])


def python_task_overhead(root: Path, sizes: Sizes, variant: str) -> Result:
    return _task_loop(sizes.tasks, [base_python(), "-c", "pass"])


def env_enter_exit(root: Path, sizes: Sizes, variant: str) -> Result:
    # An enter plus an exit is two trivial processes.
    sync_filesystems()
    latencies = []
    cpu_started, wall_started = time.process_time(), time.perf_counter()
    for _ in range(sizes.environment_pairs):
        latencies.append(_run_to_eof(["/bin/true"]) + _run_to_eof(["/bin/true"]))
    cpu_s, wall_s = time.process_time() - cpu_started, time.perf_counter() - wall_started
    summary = summarize_latencies(latencies, wall_s)
    return {
        "median_ms": summary.median_ms,
        "p95_ms": summary.p95_ms,
        "pairs_per_s": summary.per_second,
        "cpu_ms_per_pair": cpu_s * 1000.0 / len(latencies),
    }


def _floor_logger(handler: logging.Handler) -> logging.Logger:
    logger = logging.getLogger("bench.floor")
    logger.setLevel(logging.INFO)
    logger.addHandler(handler)
    return logger


def _log_lines(logger: logging.Logger, lines: list[str]) -> None:
    name, make_record, handle = logger.name, logger.makeRecord, logger.handle
    for line in lines:
        handle(make_record(name, logging.INFO, __file__, 0, line, (), None, None, _EXTRA))


def output_throughput(root: Path, sizes: Sizes, variant: str) -> Result:
    count = sizes.output_lines
    lines = [output_line(index, count, variant) for index in range(count)]
    handler = CountingHandler(check_secret=variant == "redaction")
    logger = _floor_logger(handler)
    sync_filesystems()
    try:
        cpu_started, wall_started = time.process_time(), time.perf_counter()
        _log_lines(logger, lines)
        cpu_s, wall_s = time.process_time() - cpu_started, time.perf_counter() - wall_started
    finally:
        logger.removeHandler(handler)
    # The floor does not redact, so records with the secret are expected here.
    return {"lines_per_s": count / wall_s, "cpu_us_per_line": cpu_s * 1e6 / count}


def cancel_latency(root: Path, sizes: Sizes, variant: str) -> Result:
    if variant == "terminate":
        command, cancel_signal = ["sleep", "60"], signal.SIGKILL
    else:
        graceful = (
            "import signal,sys,time;"
            "signal.signal(signal.SIGTERM,lambda *a:sys.exit(0));"
            "print('ready',flush=True);time.sleep(60)"
        )
        command, cancel_signal = [base_python(), "-c", graceful], signal.SIGTERM
    sync_filesystems()
    latencies = []
    for _ in range(sizes.cancels):
        process = subprocess.Popen(
            command,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        assert process.stdout is not None
        if variant == "terminate":
            time.sleep(0.05)
        else:
            process.stdout.readline()
        started = time.perf_counter()
        os.killpg(process.pid, cancel_signal)
        with process.stdout:
            process.stdout.read()
        process.wait()
        latencies.append(time.perf_counter() - started)
    return {
        "median_ms": statistics.median(latencies) * 1000.0,
        "max_ms": max(latencies) * 1000.0,
    }


def concurrency(root: Path, sizes: Sizes, variant: str) -> Result:
    session_count = int(variant)
    per_session = sizes.lines_per_concurrent_session
    lines = [output_line(index, per_session, "plain") for index in range(per_session)]
    handler = CountingHandler()
    logger = _floor_logger(handler)
    barrier = threading.Barrier(session_count + 1)

    def run_one() -> None:
        barrier.wait()
        _log_lines(logger, lines)

    threads = [threading.Thread(target=run_one) for _ in range(session_count)]
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
        logger.removeHandler(handler)
    total = session_count * per_session
    return {**cpu_split(usage_started, usage_ended, total), "lines_per_s": total / wall_s}


def memory(root: Path, sizes: Sizes, variant: str) -> Result:
    if variant == "lines":
        command = [base_python(), "-c", producer_snippet(), str(sizes.memory_lines), "plain", SECRET]
    elif variant == "bytes":
        command = ["/bin/sh", "-c", f"yes {'y' * 4095} | head -c {sizes.memory_bytes}"]
    else:
        shell = f"head -c {sizes.memory_line_bytes} /dev/zero | tr '\\000' a; echo"
        command = ["/bin/sh", "-c", shell]
    _run_to_eof(["/bin/true"])
    meter = PeakRssMeter()
    sync_filesystems()
    meter.start()
    wall_s = _run_to_eof(command)
    growth_mib = meter.stop_mib()
    return {"rss_growth_mib": growth_mib, "wall_s": wall_s}


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
