"""Fixtures shared by the test modules: captured session logs, jobs from YAML, the interpreter."""

from __future__ import annotations

import importlib
import logging
import sys
from collections.abc import Iterator, Mapping
from pathlib import Path
from typing import Any, Callable, NamedTuple, Optional

import pytest
import yaml
from openjd.model import (
    Job,
    create_job,
    decode_job_template,
    preprocess_job_parameters,
)

# The logger object that ``openjd.sessions.LOG`` names, looked up by name so that this file
# imports even while a module of the package under test does not.
LOG = logging.getLogger("openjd.sessions")

# The extensions that openjd-cli 0.7.5 enables by default.
ALL_EXTENSIONS = ("TASK_CHUNKING", "REDACTED_ENV_VARS", "FEATURE_BUNDLE_1")


class CollectedRecord(NamedTuple):
    """One record of the ``openjd.sessions`` logger, reduced to the fields tests compare."""

    levelname: str
    openjd_log_content: Any
    """The record's ``LogContent`` flag, or ``None`` when the record has none."""
    session_id: Optional[str]
    message: str


class _CollectingHandler(logging.Handler):
    def __init__(self) -> None:
        super().__init__(level=logging.NOTSET)
        self.records: list[CollectedRecord] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.records.append(
            CollectedRecord(
                levelname=record.levelname,
                openjd_log_content=getattr(record, "openjd_log_content", None),
                session_id=getattr(record, "session_id", None),
                message=record.getMessage(),
            )
        )


@pytest.fixture
def collect_logs() -> Iterator[list[CollectedRecord]]:
    """Record every ``openjd.sessions`` log record handled during the test, in order.

    The list fills while the test runs. The logger's level is not changed, so DEBUG
    records appear only when a test lowers it.
    """
    # Importing the package sets the logger's level to INFO.
    importlib.import_module("openjd.sessions")
    handler = _CollectingHandler()
    LOG.addHandler(handler)
    try:
        yield handler.records
    finally:
        LOG.removeHandler(handler)


JobFromYaml = Callable[..., Job]


def job_from_yaml(
    template_text: str,
    parameters: Optional[Mapping[str, str]] = None,
    *,
    extensions: tuple[str, ...] = ALL_EXTENSIONS,
    template_dir: Optional[Path] = None,
) -> Job:
    """Decode a job template from YAML text and create its job.

    ``parameters`` maps job parameter names to values as strings, as a command line
    gives them. Parameters left out take their defaults. Relative PATH values resolve
    against ``template_dir``, which defaults to the current directory.

    Raises:
        openjd.model.DecodeValidationError: the template or a parameter value is invalid.
    """
    document = yaml.safe_load(template_text)
    template = decode_job_template(template=document, supported_extensions=extensions)
    base_dir = template_dir if template_dir is not None else Path.cwd()
    values = preprocess_job_parameters(
        job_template=template,
        job_parameter_values=dict(parameters or {}),
        job_template_dir=base_dir,
        current_working_dir=base_dir,
    )
    job: Job = create_job(job_template=template, job_parameter_values=values)
    return job


@pytest.fixture(name="job_from_yaml")
def job_from_yaml_fixture() -> JobFromYaml:
    """The ``job_from_yaml`` helper of this module, for tests that prefer a fixture."""
    return job_from_yaml


@pytest.fixture
def python_exe() -> str:
    """The interpreter that runs the tests, for child programs in place of ``python3``."""
    return sys.executable
