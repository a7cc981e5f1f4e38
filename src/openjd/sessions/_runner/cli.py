"""The ``openjd-sessions`` command: ``openjd-sessions run TEMPLATE`` runs a job.

The job runs in one Session on this host by default, in N Sessions on threads of this
process with ``--workers N``, or on the workers of a Dask cluster with ``--cluster`` or
``--scheduler-file``.

Exit status: 0 when every action succeeded, and 1 when an action did not succeed or no
Session could be created. It is 2 for an invalid template, parameter or option, and for a
cluster option without the Dask extra installed. After a cancel by signal it is 128 plus
the signal number (130 for SIGINT, 143 for SIGTERM).
"""

from __future__ import annotations

import argparse
import logging
import signal
import sys
import threading
from collections.abc import Sequence
from pathlib import Path
from types import FrameType
from typing import Optional

from openjd.sessions import LOG

from .backend import Backend
from .backend_local import LocalBackend
from .coordinator import JobRunner
from .events import JobResult
from .output import OutputWriter, make_writer
from .plan import JobPlan, PlanError, build_plan

__all__ = ("main",)

EXIT_SUCCESS = 0
EXIT_FAILED = 1
EXIT_USAGE = 2

# Period of the main thread's loop: the delay before a signal is acted on, and the
# refresh period of the progress line's elapsed time.
_TICK_SECONDS = 0.1


def main(argv: Optional[Sequence[str]] = None) -> int:
    """Run the command line ``argv`` (default: ``sys.argv[1:]``) and return the exit status."""
    args = _build_parser().parse_args(argv)
    try:
        return _run(args)
    except KeyboardInterrupt:
        # Ctrl-C before the signal handlers were installed: nothing was started yet.
        return 128 + signal.SIGINT


def _build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="openjd-sessions",
        description="Run Open Job Description jobs on this host.",
    )
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")
    run = commands.add_parser(
        "run",
        help="run a job template on this host",
        description=(
            "Run every step of a job template in dependency order, or one step, in one "
            "Session on this host, in several Sessions (--workers), or on a Dask cluster "
            "(--cluster, --scheduler-file). Ctrl-C or SIGTERM cancels the running tasks and "
            "still exits the entered environments. A second Ctrl-C terminates the running "
            "actions, for example environment exits, at once."
        ),
    )
    _add_run_arguments(run)
    return parser


def _add_run_arguments(run: argparse.ArgumentParser) -> None:
    run.add_argument("template", type=Path, help="job template file (YAML, or JSON when the name ends in .json)")
    run.add_argument(
        "-p",
        "--job-param",
        dest="parameters",
        action="append",
        default=[],
        metavar="NAME=VALUE|file://PATH",
        help="job parameter value, or a YAML or JSON file mapping names to values (repeatable)",
    )
    run.add_argument("--step", metavar="NAME", help="run only this step (default: all steps)")
    run.add_argument(
        "--environment",
        dest="environments",
        action="append",
        default=[],
        type=Path,
        metavar="FILE",
        help="environment template to enter before the job environments (repeatable)",
    )
    run.add_argument(
        "--path-mapping-rules",
        type=Path,
        metavar="FILE",
        help="JSON file with a list of path mapping rules, or a pathmapping-1.0 object",
    )

    run.add_argument(
        "--preserve",
        action="store_true",
        help="keep the session working directory and print where it is",
    )
    run.add_argument(
        "--output",
        choices=("text", "json"),
        default="text",
        help="text: log lines for people (default), or json: one JSON object per event",
    )
    run.add_argument("--verbose", action="store_true", help="include DEBUG records of the openjd.sessions logger")
    _add_scaling_arguments(run)


def _add_scaling_arguments(run: argparse.ArgumentParser) -> None:
    run.add_argument(
        "--workers",
        type=_positive_int,
        metavar="N",
        help="run N Sessions in this process, each running its share of the tasks (default: 1)",
    )
    where = run.add_mutually_exclusive_group()
    where.add_argument(
        "--cluster",
        metavar="local:N|tcp://HOST:PORT|tls://HOST:PORT",
        help=(
            "run the tasks on Dask: local:N starts N single-threaded workers on 127.0.0.1, "
            "an address uses a running scheduler (needs the dask extra)"
        ),
    )
    where.add_argument(
        "--scheduler-file",
        type=Path,
        metavar="FILE",
        help="run the tasks on the Dask scheduler described by this scheduler file (needs the dask extra)",
    )
    run.add_argument(
        "--on-failure",
        choices=("finish", "cancel"),
        default="finish",
        help=(
            "what running tasks do when a task fails: finish (default) lets them end on their "
            "own, cancel cancels them with their cancelation method"
        ),
    )


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"invalid value {text!r}: expected a whole number of 1 or more") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"invalid value {value}: expected 1 or more")
    return value


def _make_backend(args: argparse.Namespace) -> Backend:
    """Create the backend that the options select.

    Raises:
        PlanError: the options conflict, a cluster address is invalid, or Dask is missing.
    """
    on_cluster = args.cluster is not None or args.scheduler_file is not None
    if on_cluster and args.workers is not None:
        raise PlanError(
            "--workers runs Sessions in this process and cannot be combined with --cluster or "
            "--scheduler-file; use --cluster local:N for N workers on a local Dask cluster."
        )
    if not on_cluster:
        return LocalBackend(workers=args.workers or 1, retain_working_dir=args.preserve)

    # Imported here so that a run without a cluster option never imports Dask.
    from .backend_dask import DaskBackend, parse_cluster_option

    target = parse_cluster_option(args.cluster, args.scheduler_file)
    return DaskBackend(target, retain_working_dir=args.preserve, verbose=args.verbose)


def _run(args: argparse.Namespace) -> int:
    try:
        plan = build_plan(
            template_path=args.template,
            parameter_args=args.parameters,
            environment_paths=args.environments,
            step_name=args.step,
            path_mapping_path=args.path_mapping_rules,
        )
        backend = _make_backend(args)
    except PlanError as exc:
        print(f"openjd-sessions run: error: {exc}", file=sys.stderr)
        return EXIT_USAGE

    if args.verbose:
        LOG.setLevel(logging.DEBUG)
    interactive = sys.stderr.isatty()
    several_workers = (args.workers or 1) > 1 or args.cluster is not None or args.scheduler_file is not None
    writer = make_writer(
        args.output,
        sys.stdout,
        sys.stderr,
        step_count=len(plan.steps),
        show_progress=interactive,
        show_worker=several_workers,
    )
    runner = JobRunner(backend, cancel_running_on_failure=args.on_failure == "cancel")

    run = _SupervisedRun(runner, plan, writer, several_workers=several_workers)
    result = run.wait()
    if result is None:
        return EXIT_FAILED

    writer.finish(result, show_summary=interactive or args.output == "text", preserved=args.preserve)
    if result.succeeded:
        return EXIT_SUCCESS
    if run.signals:
        return 128 + run.signals[0]
    return EXIT_FAILED


class _SupervisedRun:
    """Run the job on a thread of its own while the main thread handles signals.

    The signal handler only records the signal number. The main thread acts on it on its
    next loop, so the handler never takes a lock that the interrupted code might hold.
    """

    def __init__(self, runner: JobRunner, plan: JobPlan, writer: OutputWriter, *, several_workers: bool) -> None:
        self._runner = runner
        self._actions = "actions" if several_workers else "action"
        self._plan = plan
        self._writer = writer
        self.signals: list[int] = []
        self._result: Optional[JobResult] = None
        self._error: Optional[BaseException] = None

    def wait(self) -> Optional[JobResult]:
        """Run the job and return its result, or ``None`` after writing why it could not run."""
        worker = threading.Thread(target=self._work, name="openjd-sessions-run")
        previous = {number: signal.signal(number, self._record_signal) for number in (signal.SIGINT, signal.SIGTERM)}
        try:
            worker.start()
            handled = 0
            while worker.is_alive():
                worker.join(_TICK_SECONDS)
                while handled < len(self.signals):
                    handled += 1
                    self._cancel(self.signals[handled - 1], immediate=handled > 1)
                self._writer.tick()
        finally:
            for number, handler in previous.items():
                signal.signal(number, handler)

        if isinstance(self._error, (OSError, RuntimeError)):
            self._writer.notice(f"openjd-sessions run: error: cannot run the job: {self._error}")
            return None
        if self._error is not None:
            raise self._error
        return self._result

    def _work(self) -> None:
        try:
            self._result = self._runner.run_job(self._plan, self._writer)
        except BaseException as exc:  # re-raised or reported on the main thread
            self._error = exc

    def _record_signal(self, number: int, frame: Optional[FrameType]) -> None:
        self.signals.append(number)

    def _cancel(self, number: int, *, immediate: bool) -> None:
        name = signal.Signals(number).name
        if immediate:
            self._writer.notice(
                f"openjd-sessions run: {name} received while canceling; terminating the running {self._actions} now."
            )
        else:
            self._writer.notice(
                f"openjd-sessions run: {name} received; canceling the job and exiting its "
                f"environments. Send it again to terminate the running {self._actions} at once."
            )
        self._runner.cancel(immediate=immediate)


if __name__ == "__main__":
    sys.exit(main())
