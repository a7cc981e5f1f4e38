"""Run one benchmark workload once and print its metrics.

Usage: ``python benchmarks/workloads.py WORKLOAD [--variant V] [--floor] [--root DIR]
[--quick] [--json]``. Without ``--floor`` the workload drives ``openjd.sessions`` from the
interpreter's environment; with ``--floor`` it runs the standard-library floor instead.
``run.py`` starts one such process per workload, variant, build and round.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import tempfile
import time
import traceback
from pathlib import Path
from typing import Any, Callable

_HERE = Path(__file__).resolve().parent
# This folder holds a profile.py that would shadow the standard-library module of the same
# name (cProfile imports it), so the folder goes to the end of the search path.
sys.path[:] = [entry for entry in sys.path if Path(entry or ".").resolve() != _HERE]
sys.path.append(str(_HERE))

from _bench_config import VARIANTS, sizes_for  # noqa: E402

WorkloadFunction = Callable[[Path, Any, str], dict[str, Any]]


def load_workload(name: str, floor: bool) -> WorkloadFunction:
    """Return the workload function; importing the library side imports ``openjd.sessions``."""
    if floor:
        import _bench_floor

        return _bench_floor.WORKLOADS[name]
    import _bench_lib

    return _bench_lib.WORKLOADS[name]


def parse_arguments(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("workload", choices=sorted(VARIANTS))
    parser.add_argument("--variant", default=None, help="variant of the workload (default: first)")
    parser.add_argument("--floor", action="store_true", help="run the standard-library floor")
    parser.add_argument("--root", type=Path, default=None,
                        help="directory for session working directories (default: a temp dir)")
    parser.add_argument("--quick", action="store_true", help="use the small smoke-run sizes")
    parser.add_argument("--json", action="store_true", help="print one JSON object")
    arguments = parser.parse_args(argv)
    variants = VARIANTS[arguments.workload]
    if arguments.variant is None:
        arguments.variant = variants[0]
    if arguments.variant not in variants:
        parser.error(
            f"invalid variant {arguments.variant!r} for {arguments.workload};"
            f" choose one of {', '.join(repr(v) for v in variants)}"
        )
    return arguments


def run(arguments: argparse.Namespace) -> dict[str, Any]:
    result: dict[str, Any] = {
        "workload": arguments.workload,
        "variant": arguments.variant,
        "side": "floor" if arguments.floor else "library",
        "python": sys.executable,
    }
    started = time.perf_counter()
    try:
        function = load_workload(arguments.workload, arguments.floor)
        if not arguments.floor:
            from openjd.sessions import version

            result["library_version"] = version
        arguments.root.mkdir(parents=True, exist_ok=True)
        root = Path(tempfile.mkdtemp(dir=arguments.root, prefix="worker")).resolve()
        try:
            metrics = function(root, sizes_for(arguments.quick), arguments.variant)
        finally:
            _remove_tree(root)
        result["problems"] = metrics.pop("problems", [])
        result["metrics"] = metrics
    except Exception as exc:
        result["error"] = f"{type(exc).__name__}: {exc}"
        result["traceback"] = traceback.format_exc()
    result["elapsed_s"] = time.perf_counter() - started
    return result


def _remove_tree(root: Path) -> None:
    import shutil

    shutil.rmtree(root, ignore_errors=True)


def main(argv: list[str]) -> int:
    arguments = parse_arguments(argv)
    if os.name != "posix":
        print("the benchmarks run POSIX commands (/bin/true, sleep, sh) and need Linux or macOS",
              file=sys.stderr)
        return 2
    if arguments.root is None:
        arguments.root = Path(tempfile.gettempdir()) / "openjd-bench"
    result = run(arguments)
    if arguments.json:
        print(json.dumps(result))
    else:
        for key, value in result.items():
            if key == "metrics":
                print("metrics:")
                for name, number in value.items():
                    print(f"  {name:>20} = {number:.4g}")
            else:
                print(f"{key}: {value}")
    return 1 if "error" in result else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
