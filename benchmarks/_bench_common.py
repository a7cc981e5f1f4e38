"""Helpers shared by the library workloads and the stdlib floor workloads.

Only the standard library is imported here, so the floor runs never load
``openjd.sessions`` or ``openjd.model``.
"""

from __future__ import annotations

import logging
import os
import re
import resource
import statistics
import sys
from dataclasses import dataclass

# Every data line a producer prints is exactly this many bytes, newline included.
LINE_BYTES = 100
DATA_PREFIX = "bench-line "
PROGRESS_PREFIX = "openjd_progress: "
# A secret without characters that a shell, a format string or %-formatting treats specially.
SECRET = "Zq7plumORBIT4411secret"
SECRET_VARIABLE = "BENCH_SECRET"

# A workload fails if one action runs longer than this, so a hung action cannot stall the run.
ACTION_TIMEOUT_S = 900.0

_PAD = "x" * (LINE_BYTES - len(DATA_PREFIX) - len("0000000 ") - 1)


def base_python() -> str:
    """Return the interpreter behind this venv, so child processes start without venv paths.

    Both venvs come from the same base interpreter, so child start-up costs are equal.
    """
    return getattr(sys, "_base_executable", None) or sys.executable


def output_line(index: int, count: int, mode: str) -> str:
    """Return the text of output line ``index`` of ``count`` (without the newline).

    ``mode`` is ``plain``, ``progress`` (every fifth line is an ``openjd_progress``
    message) or ``redaction`` (every tenth data line contains ``SECRET``).
    This function and ``producer_snippet`` produce the same lines.
    """
    if mode == "progress" and index % 5 == 4:
        return f"{PROGRESS_PREFIX}{index * 100.0 / count:.2f}"
    body = (SECRET + _PAD)[: len(_PAD)] if mode == "redaction" and index % 10 == 3 else _PAD
    return f"{DATA_PREFIX}{index:07d} {body}"


def producer_snippet() -> str:
    """Return a one-line ``python -c`` program that prints ``output_line`` lines in bulk.

    Arguments of the program: line count, mode, secret. It contains no newline and no
    ``{{``, because the action's arguments are Open Job Description format strings.
    """
    return (
        "import sys;"
        "n=int(sys.argv[1]);m=sys.argv[2];s=sys.argv[3];"
        f"p='x'*{len(_PAD)};pre={DATA_PREFIX!r};prog={PROGRESS_PREFIX!r};"
        "line=lambda i:(prog+'%.2f\\n'%(i*100.0/n)) if m=='progress' and i%5==4 "
        "else pre+'%07d '%i+((s+p)[:len(p)] if m=='redaction' and i%10==3 else p)+'\\n';"
        "w=sys.stdout.buffer.write;"
        "[w(''.join(map(line,range(j,min(j+2000,n)))).encode()) for j in range(0,n,2000)]"
    )


class CountingHandler(logging.Handler):
    """Logging handler that counts producer lines and records that contain the secret.

    The library runs and the floor runs attach the same handler, so its own cost is part of
    both sides of every output comparison.
    """

    def __init__(self, check_secret: bool = False) -> None:
        super().__init__(logging.DEBUG)
        self.records = 0
        self.lines = 0
        self.leaked_secrets = 0
        self._check_secret = check_secret

    def emit(self, record: logging.LogRecord) -> None:
        self.records += 1
        message = record.msg
        if message.__class__ is not str:
            return
        if message.startswith(DATA_PREFIX) or message.startswith(PROGRESS_PREFIX):
            self.lines += 1
        if self._check_secret and SECRET in message:
            self.leaked_secrets += 1


_STATUS_FIELD = re.compile(r"^(VmRSS|VmHWM):\s+(\d+) kB$", re.MULTILINE)


def _read_status_kib() -> dict[str, int]:
    with open("/proc/self/status", encoding="ascii") as status:
        text = status.read()
    return {name: int(value) for name, value in _STATUS_FIELD.findall(text)}


class PeakRssMeter:
    """Peak resident-set growth of this process between ``start()`` and ``stop()``.

    On Linux it resets the kernel's high-water mark (``VmHWM``) by writing ``5`` to
    ``/proc/self/clear_refs``. Where that fails it falls back to ``ru_maxrss``, which
    reports growth above the process's earlier peak only, and records that in ``method``.
    """

    def __init__(self) -> None:
        self.method = "VmHWM after clear_refs"
        self._baseline_kib = 0

    def start(self) -> None:
        try:
            with open("/proc/self/clear_refs", "w", encoding="ascii") as clear_refs:
                clear_refs.write("5")
            self._baseline_kib = _read_status_kib()["VmRSS"]
        except OSError:
            self.method = "ru_maxrss (growth above the earlier peak only)"
            self._baseline_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss

    def stop_mib(self) -> float:
        """Return the growth in MiB since ``start()``."""
        if self.method.startswith("VmHWM"):
            peak_kib = _read_status_kib()["VmHWM"]
        else:
            peak_kib = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
        return max(0, peak_kib - self._baseline_kib) / 1024.0


@dataclass
class LatencySummary:
    median_ms: float
    p95_ms: float
    per_second: float


def summarize_latencies(latencies_s: list[float], wall_s: float) -> LatencySummary:
    ordered = sorted(latencies_s)
    p95_index = max(0, min(len(ordered) - 1, int(round(0.95 * len(ordered))) - 1))
    return LatencySummary(
        median_ms=statistics.median(ordered) * 1000.0,
        p95_ms=ordered[p95_index] * 1000.0,
        per_second=len(ordered) / wall_s if wall_s > 0 else float("nan"),
    )


def cpu_usage() -> tuple[float, float]:
    """Return this process's user and system CPU seconds, all threads included."""
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime, usage.ru_stime


def cpu_split(started: tuple[float, float], ended: tuple[float, float], lines: int) -> dict[str, float]:
    """Return the CPU time per line between two ``cpu_usage()`` calls and its kernel share.

    With many threads, waiting for the GIL and for handler locks shows up as kernel time.
    """
    user_s = ended[0] - started[0]
    system_s = ended[1] - started[1]
    total_s = user_s + system_s
    return {
        "cpu_us_per_line": total_s * 1e6 / lines,
        "system_cpu_pct": 100.0 * system_s / total_s if total_s > 0 else 0.0,
    }


def sync_filesystems() -> None:
    """Flush dirty pages so file creation costs do not carry over from an earlier run."""
    if hasattr(os, "sync"):
        os.sync()
