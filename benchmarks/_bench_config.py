"""Workload names, their variants, and their sizes for a full run and a ``--quick`` run."""

from __future__ import annotations

from dataclasses import dataclass

MIB = 1024 * 1024


@dataclass(frozen=True)
class Sizes:
    session_creates: int
    tasks: int
    environment_pairs: int
    output_lines: int
    cancels: int
    lines_per_concurrent_session: int
    memory_lines: int
    memory_bytes: int
    memory_line_bytes: int


FULL = Sizes(
    session_creates=50,
    tasks=200,
    environment_pairs=50,
    output_lines=200_000,
    cancels=10,
    lines_per_concurrent_session=5_000,
    memory_lines=200_000,
    memory_bytes=1024 * MIB,
    memory_line_bytes=100 * MIB,
)

QUICK = Sizes(
    session_creates=10,
    tasks=20,
    environment_pairs=10,
    output_lines=20_000,
    cancels=3,
    lines_per_concurrent_session=1_000,
    memory_lines=20_000,
    memory_bytes=64 * MIB,
    memory_line_bytes=10 * MIB,
)


def sizes_for(quick: bool) -> Sizes:
    return QUICK if quick else FULL


# Each workload runs once per variant, in a fresh worker process per variant.
VARIANTS: dict[str, tuple[str, ...]] = {
    "session_create": ("",),
    "task_overhead": ("",),
    "python_task_overhead": ("",),
    "env_enter_exit": ("",),
    "output_throughput": ("plain", "progress", "redaction"),
    "cancel_latency": ("terminate", "notify"),
    "concurrency": ("1", "8", "32"),
    "memory": ("lines", "bytes", "long_line"),
}
