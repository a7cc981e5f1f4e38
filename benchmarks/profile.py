"""Run one benchmark workload under cProfile, in every thread, and print the top functions.

Usage: ``python3 benchmarks/profile.py WORKLOAD [--variant V] [--quick] [--top N]
[--side ours|upstream]``. It re-runs itself with the interpreter of
``benchmarks/.venvs/<side>/`` (build the venvs first with ``run.py``), so the profile is
of the installed, non-editable package. Profiling slows Python code down several times,
so use the output to rank functions, not to read absolute times.
"""

from __future__ import annotations

import argparse
import os
import sys
import tempfile
import threading
import time
from pathlib import Path
from typing import Any

HERE = Path(__file__).resolve().parent
# This file's name shadows the standard-library ``profile`` module that cProfile imports,
# so this folder must come after the standard library on the search path.
sys.path[:] = [entry for entry in sys.path if Path(entry or ".").resolve() != HERE]
sys.path.append(str(HERE))

import cProfile  # noqa: E402
import pstats  # noqa: E402

from _bench_config import VARIANTS, sizes_for  # noqa: E402


def parse_arguments(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("workload", choices=sorted(VARIANTS))
    parser.add_argument("--variant", default=None, help="variant of the workload (default: first)")
    parser.add_argument("--quick", action="store_true", help="use the small smoke-run sizes")
    parser.add_argument("--top", type=int, default=25, help="functions to list (default 25)")
    parser.add_argument("--clock", choices=("cpu", "wall"), default="cpu",
                        help="cpu (default): per-thread CPU time, so blocked waits cost"
                             " nothing; wall: elapsed time, waits included")
    parser.add_argument("--save", type=Path, default=None,
                        help="also write the merged stats to this file (read it with pstats)")
    parser.add_argument("--side", choices=("ours", "upstream"), default="ours",
                        help="which venv under benchmarks/.venvs to profile (default ours)")
    arguments = parser.parse_args(argv)
    variants = VARIANTS[arguments.workload]
    if arguments.variant is None:
        arguments.variant = variants[0]
    if arguments.variant not in variants:
        parser.error(f"invalid variant {arguments.variant!r}; choose one of {variants}")
    return arguments


def reexecute_in_venv(side: str) -> None:
    """Replace this process with the same command run by the venv's interpreter."""
    python = HERE / ".venvs" / side / "bin" / "python"
    if Path(sys.prefix).resolve() == python.parent.parent.resolve():
        return
    if not python.is_file():
        sys.exit(f"{python} not found; create the venvs first with: python3 {HERE / 'run.py'}"
                 " --rounds 1 --only session_create")
    os.execv(str(python), [str(python), str(Path(__file__).resolve()), *sys.argv[1:]])


def profile_workload(arguments: argparse.Namespace) -> pstats.Stats:
    import _bench_lib

    function = _bench_lib.WORKLOADS[arguments.workload]
    # Each thread gets its own profiler, so the thread's own CPU clock is the right timer.
    clock = time.thread_time if arguments.clock == "cpu" else time.perf_counter
    thread_profiles: list[cProfile.Profile] = []

    def start_thread_profile(*_: Any) -> None:
        # Runs once per new thread, on its first profiling event, because enable() replaces
        # this hook with the profiler for the rest of the thread's life.
        profile = cProfile.Profile(clock)
        thread_profiles.append(profile)
        profile.enable()

    main_profile = cProfile.Profile(clock)
    root = Path(tempfile.mkdtemp(prefix="openjd-bench-profile")).resolve()
    threading.setprofile(start_thread_profile)
    main_profile.enable()
    try:
        metrics = function(root, sizes_for(arguments.quick), arguments.variant)
    finally:
        main_profile.disable()
        threading.setprofile(None)
        import shutil

        shutil.rmtree(root, ignore_errors=True)
    print(f"metrics (under the profiler): {metrics}")
    stats = pstats.Stats(main_profile)
    for profile in thread_profiles:
        stats.add(profile)
    return stats


def main(argv: list[str]) -> int:
    arguments = parse_arguments(argv)
    reexecute_in_venv(arguments.side)
    from openjd.sessions import version

    print(f"profiling {arguments.workload}/{arguments.variant} with openjd.sessions {version}"
          f" from {sys.prefix}")
    stats = profile_workload(arguments)
    if arguments.save is not None:
        stats.dump_stats(str(arguments.save))
    stats.sort_stats("tottime")
    print(f"\n=== top {arguments.top} functions by own {arguments.clock} time, all threads ===")
    stats.print_stats(arguments.top)
    print(f"\n=== top {arguments.top} openjd.sessions functions by cumulative {arguments.clock}"
          " time ===")
    stats.sort_stats("cumulative")
    stats.print_stats("openjd/sessions", arguments.top)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
