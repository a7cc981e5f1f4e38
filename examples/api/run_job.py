"""Run every task of a job template in one Session, using the openjd.sessions API directly.

Usage: python run_job.py TEMPLATE [NAME=VALUE ...]

The job environments are entered first, then each step's environments and tasks run in
dependency order, and the environments are exited in reverse order at the end, even after
a failure. The exit status is 0 when every action succeeded and 1 otherwise.
"""

from __future__ import annotations

import logging
import sys
import threading
from pathlib import Path

import yaml
from openjd.model import (
    RevisionExtensions,
    StepDependencyGraph,
    StepParameterSpaceIterator,
    create_job,
    decode_job_template,
    preprocess_job_parameters,
)

from openjd.sessions import LOG, ActionState, ActionStatus, Session, SessionState

EXTENSIONS = ["TASK_CHUNKING", "REDACTED_ENV_VARS", "FEATURE_BUNDLE_1"]


class ActionWaiter:
    """Session callback that lets the main thread wait for the end of each action."""

    def __init__(self) -> None:
        self._ended = threading.Event()
        self._state = ActionState.RUNNING

    def __call__(self, session_id: str, status: ActionStatus) -> None:
        # The session calls this on its own threads, or inside a start method for
        # actions that end before a process starts.
        if status.state != ActionState.RUNNING:
            self._state = status.state
            self._ended.set()

    def wait(self) -> ActionState:
        """Block until the current action ends and return its final state."""
        self._ended.wait()
        self._ended.clear()
        return self._state


def main(argv: list[str]) -> int:
    template_path = Path(argv[0]).resolve()
    parameter_values = dict(argument.split("=", 1) for argument in argv[1:])

    # 1. Decode the template and create the job, as a scheduler would.
    template = decode_job_template(
        template=yaml.safe_load(template_path.read_text()), supported_extensions=EXTENSIONS
    )
    job_parameters = preprocess_job_parameters(
        job_template=template,
        job_parameter_values=parameter_values,
        job_template_dir=template_path.parent,
        current_working_dir=Path.cwd(),
    )
    job = create_job(job_template=template, job_parameter_values=job_parameters)

    # 2. Print the session's log records. Each one carries the session id.
    handler = logging.StreamHandler(sys.stdout)
    handler.setFormatter(logging.Formatter("%(session_id)s  %(message)s"))
    LOG.addHandler(handler)

    waiter = ActionWaiter()
    entered = []
    with Session(
        session_id="api-demo",
        job_parameter_values=job_parameters,
        callback=waiter,
        revision_extensions=RevisionExtensions(
            spec_rev=job.revision, supported_extensions=EXTENSIONS
        ),
    ) as session:
        # 3. Enter the job environments, then run the steps in dependency order.
        # After a failure the session is READY_ENDING and only exits are allowed.
        for environment in job.jobEnvironments or []:
            entered.append(session.enter_environment(environment=environment))
            waiter.wait()
        for step in StepDependencyGraph(job=job).topo_sorted():
            step_entered = []
            for environment in step.stepEnvironments or []:
                if session.state == SessionState.READY:
                    step_entered.append(session.enter_environment(environment=environment))
                    waiter.wait()
            for task_parameters in StepParameterSpaceIterator(space=step.parameterSpace):
                if session.state != SessionState.READY:
                    break
                session.run_task(step_script=step.script, task_parameter_values=task_parameters)
                waiter.wait()
            step_succeeded = session.state == SessionState.READY

            # 4. Exit this step's environments, most recent first.
            while step_entered:
                session.exit_environment(identifier=step_entered.pop(), keep_session_running=True)
                waiter.wait()
            if not step_succeeded:
                break
        succeeded = session.state == SessionState.READY

        # 5. Exit the job environments. Without keep_session_running the session ends.
        while entered:
            session.exit_environment(identifier=entered.pop())
            if waiter.wait() != ActionState.SUCCESS:
                succeeded = False

    LOG.removeHandler(handler)
    return 0 if succeeded else 1


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
