"""Regression tests for faults found by trying to break the library."""

from __future__ import annotations

import threading

from openjd.model import create_job, decode_job_template

from openjd.sessions import ActionState, Session, SessionState

TIMEOUT = 30.0


def _job(template: dict[str, object]):  # type: ignore[no-untyped-def]
    return create_job(job_template=decode_job_template(template=template), job_parameter_values={})


def test_nul_in_env_value_fails_environment(tmp_path) -> None:  # type: ignore[no-untyped-def]
    job = _job(
        {
            "specificationVersion": "jobtemplate-2023-09",
            "name": "J",
            "jobEnvironments": [
                {
                    "name": "E",
                    "script": {
                        "actions": {
                            "onEnter": {"command": "/usr/bin/printf", "args": ['openjd_env: "X=a\\\\u0000b"\\n']}
                        }
                    },
                }
            ],
            "steps": [{"name": "S", "script": {"actions": {"onRun": {"command": "/bin/true"}}}}],
        }
    )
    ended = threading.Event()
    session = Session(
        session_id="nul",
        job_parameter_values={},
        session_root_directory=tmp_path,
        callback=lambda _, status: status.state != ActionState.RUNNING and ended.set(),
    )
    try:
        session.enter_environment(environment=job.jobEnvironments[0])
        assert ended.wait(TIMEOUT)

        status = session.action_status
        assert status is not None
        assert status.state == ActionState.FAILED
        assert "NUL" in (status.fail_message or "")
        assert session.state == SessionState.READY_ENDING
    finally:
        session.cleanup()


def test_cancel_before_spawn_is_applied(tmp_path) -> None:  # type: ignore[no-untyped-def]
    job = _job(
        {
            "specificationVersion": "jobtemplate-2023-09",
            "name": "J",
            "steps": [
                {
                    "name": "S",
                    "script": {
                        "actions": {"onRun": {"command": "/bin/sh", "args": ["{{Task.File.Run}}"]}},
                        "embeddedFiles": [{"name": "Run", "type": "TEXT", "data": "sleep 30"}],
                    },
                }
            ],
        }
    )
    for attempt in range(10):
        ended = threading.Event()
        session = Session(
            session_id=f"early{attempt}",
            job_parameter_values={},
            session_root_directory=tmp_path,
            callback=lambda _, status, ended=ended: status.state != ActionState.RUNNING and ended.set(),
        )

        def cancel_when_running(session: Session = session) -> None:
            while session.state != SessionState.RUNNING:
                pass
            session.cancel_action()

        canceller = threading.Thread(target=cancel_when_running)
        canceller.start()
        try:
            session.run_task(step_script=job.steps[0].script, task_parameter_values={})
            canceller.join(TIMEOUT)
            assert ended.wait(TIMEOUT)

            status = session.action_status
            assert status is not None
            assert status.state == ActionState.CANCELED
        finally:
            session.cleanup()


def test_secret_cut_between_pieces_masked() -> None:
    from openjd.sessions._messages import Redactor

    redactor = Redactor()
    redactor.add("S3CR3T-VALUE")
    first = "a" * 63990 + "S3CR3T-VAL"
    second = "UE and more"

    masked_first = redactor.redact_piece_edges(first, continues=True, continued=False)
    masked_second = redactor.redact_piece_edges(second, continues=False, continued=True)

    assert not masked_first.endswith("S3CR3T-VAL")
    assert masked_first.endswith("********")
    assert masked_second == "******** and more"


def test_raising_log_handler_does_not_fail_action(tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    import logging

    from openjd.model.v2023_09 import Action, ArgString, CommandString, StepActions, StepScript

    from openjd.sessions import LOG

    class RaisingHandler(logging.Handler):
        def emit(self, record: logging.LogRecord) -> None:
            if "boom" in record.getMessage():
                raise RuntimeError("handler failed")

    handler = RaisingHandler()
    LOG.addHandler(handler)
    ended = threading.Event()
    script = StepScript(
        actions=StepActions(
            onRun=Action(command=CommandString("/bin/sh"), args=[ArgString("-c"), ArgString("echo boom; echo after")])
        )
    )
    session = Session(
        session_id="raising",
        job_parameter_values={},
        session_root_directory=tmp_path,
        callback=lambda _, status: status.state != ActionState.RUNNING and ended.set(),
    )
    try:
        session.run_task(step_script=script, task_parameter_values={})
        assert ended.wait(TIMEOUT)

        status = session.action_status
        assert status is not None
        assert status.state == ActionState.SUCCESS
        assert "handler failed" in capsys.readouterr().err
    finally:
        LOG.removeHandler(handler)
        session.cleanup()


def test_oversized_environment_named_in_fail_message(tmp_path) -> None:  # type: ignore[no-untyped-def]
    from openjd.model.v2023_09 import Action, CommandString, StepActions, StepScript

    ended = threading.Event()
    # 40 variables of 100,000 bytes pass the per-variable limit but not the total one.
    variables = {f"BIG_{index}": "x" * 100_000 for index in range(40)}
    session = Session(
        session_id="big",
        job_parameter_values={},
        session_root_directory=tmp_path,
        os_env_vars=variables,
        callback=lambda _, status: status.state != ActionState.RUNNING and ended.set(),
    )
    try:
        session.run_task(
            step_script=StepScript(actions=StepActions(onRun=Action(command=CommandString("/bin/true")))),
            task_parameter_values={},
        )
        assert ended.wait(TIMEOUT)

        status = session.action_status
        assert status is not None
        assert status.state == ActionState.FAILED
        assert "E2BIG" in (status.fail_message or "")
    finally:
        session.cleanup()


def test_runner_text_escapes_terminal_controls() -> None:
    from openjd.sessions._runner.output import _escape_controls

    assert _escape_controls("red \x1b[31mtext\x07\tend\nnext") == "red \\x1b[31mtext\\x07\tend\nnext"
