"""Turn a job template, parameter values and run options into a ``JobPlan``.

The plan contains everything a backend needs to run the job. It lists the environments
to enter and the steps in dependency order, with their environments and tasks. It also
carries the job parameter values, the path mapping rules, and the specification revision
and extensions for each Session.
Every problem with the input raises ``PlanError`` with a message for the user.
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from enum import Enum
from pathlib import Path
from typing import Any, Optional

import yaml  # type: ignore[import-untyped]  # openjd-model depends on pyyaml
from openjd.model import (
    EnvironmentTemplate,
    Job,
    JobParameterValues,
    JobTemplate,
    RevisionExtensions,
    SpecificationRevision,
    Step,
    StepDependencyGraph,
    StepParameterSpace,
    StepParameterSpaceIterator,
    TaskParameterSet,
    create_job,
    decode_environment_template,
    decode_job_template,
    preprocess_job_parameters,
)

from openjd.sessions import EnvironmentModel, PathMappingRule, StepScriptModel

__all__ = (
    "SUPPORTED_EXTENSIONS",
    "JobPlan",
    "PlanError",
    "StepPlan",
    "build_plan",
    "load_path_mapping_rules",
    "parse_job_parameters",
)

SUPPORTED_EXTENSIONS = ("TASK_CHUNKING", "REDACTED_ENV_VARS", "FEATURE_BUNDLE_1")
"""Template extensions the runner accepts. openjd-cli 0.7.5 enables the same three by default."""

_FILE_PREFIX = "file://"
_PATH_MAPPING_VERSION = "pathmapping-1.0"


class PlanError(Exception):
    """Error for an invalid template, parameter or option, with a message for the user."""


@dataclass(frozen=True)
class StepPlan:
    """One step to run: its script, its environments and its parameter space."""

    name: str
    script: StepScriptModel
    environments: tuple[EnvironmentModel, ...]
    parameter_space: Optional[StepParameterSpace]
    task_count: int
    """Number of tasks, where a chunk of a ``CHUNK[INT]`` parameter counts as one task."""
    dependencies: tuple[str, ...] = ()
    """Names of the steps of the plan that must finish before this step starts."""

    def tasks(self) -> Iterator[TaskParameterSet]:
        """Iterate the task parameter sets in order, computing each one when requested."""
        return iter(_space_iterator(self.parameter_space))


@dataclass(frozen=True)
class JobPlan:
    """A job ready to run: environments first, then the steps in dependency order."""

    job_name: str
    job_parameter_values: JobParameterValues
    environments: tuple[EnvironmentModel, ...]
    """Environments of the extra environment templates, then the job's own environments."""
    steps: tuple[StepPlan, ...]
    path_mapping_rules: tuple[PathMappingRule, ...]
    specification_revision: SpecificationRevision
    extensions: tuple[str, ...]
    """Extensions that the job template or an environment template enables."""

    def revision_extensions(self) -> RevisionExtensions:
        """Build a new ``RevisionExtensions`` for one Session, because the object is mutable."""
        return RevisionExtensions(spec_rev=self.specification_revision, supported_extensions=self.extensions)


def build_plan(
    *,
    template_path: Path,
    parameter_args: Sequence[str] = (),
    environment_paths: Sequence[Path] = (),
    step_name: Optional[str] = None,
    path_mapping_path: Optional[Path] = None,
) -> JobPlan:
    """Load and validate everything a run needs, in the order a user would fix problems.

    Raises:
        PlanError: a file is missing or unreadable, a document does not parse, a template
            or parameter is invalid, or ``step_name`` is not a step of the job.
    """
    template = _decode_job_template(template_path)
    environment_templates = [_decode_environment_template(path) for path in environment_paths]
    input_values = parse_job_parameters(parameter_args)
    rules = load_path_mapping_rules(path_mapping_path) if path_mapping_path else []

    try:
        parameter_values = preprocess_job_parameters(
            job_template=template,
            job_parameter_values=input_values,
            job_template_dir=template_path.resolve().parent,
            current_working_dir=Path.cwd(),
            environment_templates=environment_templates or None,
        )
    except ValueError as exc:
        raise PlanError(f"Invalid job parameters for {template_path}:\n{exc}") from exc
    try:
        job = create_job(
            job_template=template,
            job_parameter_values=parameter_values,
            environment_templates=environment_templates or None,
        )
    except ValueError as exc:
        raise PlanError(f"Cannot create the job of {template_path} from these parameters:\n{exc}") from exc

    extensions = set(template.extensions or [])
    for environment_template in environment_templates:
        extensions.update(environment_template.extensions or [])
    environments = [environment_template.environment for environment_template in environment_templates]
    environments.extend(job.jobEnvironments or [])

    return JobPlan(
        job_name=job.name,
        job_parameter_values=parameter_values,
        environments=tuple(environments),
        steps=_plan_steps(_ordered_steps(job, step_name)),
        path_mapping_rules=tuple(rules),
        specification_revision=_specification_revision(template),
        extensions=tuple(sorted(_extension_name(name) for name in extensions)),
    )


def parse_job_parameters(args: Sequence[str]) -> dict[str, str]:
    """Merge ``NAME=VALUE`` and ``file://PATH`` arguments, where a later value for a name wins.

    A parameter file contains a YAML or JSON mapping of parameter name to value.
    """
    values: dict[str, str] = {}
    for arg in args:
        if arg.startswith(_FILE_PREFIX):
            path = Path(arg[len(_FILE_PREFIX) :])
            document = _load_document(path, "job parameter file")
            for name, value in document.items():
                values[str(name)] = _parameter_value_text(name, value, path)
            continue

        name, separator, value = arg.partition("=")
        if not separator or not name:
            raise PlanError(
                f"Invalid job parameter argument {arg!r}: expected NAME=VALUE or "
                f"{_FILE_PREFIX}PATH, for example -p Frames=1-10."
            )
        values[name] = value
    return values


def load_path_mapping_rules(path: Path) -> list[PathMappingRule]:
    """Read path mapping rules from a JSON file.

    The file contains either a list of rule objects or an object
    ``{"version": "pathmapping-1.0", "path_mapping_rules": [...]}``.
    """
    try:
        document = json.loads(_read_text(path, "path mapping rules file"))
    except json.JSONDecodeError as exc:
        raise PlanError(f"Path mapping rules file {path} is not valid JSON: {exc}") from exc

    if isinstance(document, dict):
        version = document.get("version", _PATH_MAPPING_VERSION)
        if version != _PATH_MAPPING_VERSION:
            raise PlanError(
                f"Path mapping rules file {path} has version {version!r}; "
                f"the supported version is {_PATH_MAPPING_VERSION!r}."
            )
        document = document.get("path_mapping_rules")
    if not isinstance(document, list):
        raise PlanError(
            f"Path mapping rules file {path} must contain a list of rules or an object "
            f'with the key "path_mapping_rules" that holds that list.'
        )

    rules = []
    for index, rule in enumerate(document):
        if not isinstance(rule, dict):
            raise PlanError(f"Path mapping rule {index} in {path} is not a JSON object.")
        try:
            rules.append(PathMappingRule.from_dict(rule))
        except (ValueError, TypeError, AttributeError) as exc:
            raise PlanError(f"Path mapping rule {index} in {path} is invalid: {exc}") from exc
    return rules


def _decode_job_template(path: Path) -> JobTemplate:
    document = _load_document(path, "job template")
    try:
        return decode_job_template(template=document, supported_extensions=SUPPORTED_EXTENSIONS)
    except (ValueError, NotImplementedError) as exc:
        raise PlanError(f"Invalid job template {path}:\n{exc}") from exc


def _decode_environment_template(path: Path) -> EnvironmentTemplate:
    document = _load_document(path, "environment template")
    try:
        return decode_environment_template(template=document, supported_extensions=SUPPORTED_EXTENSIONS)
    except (ValueError, NotImplementedError) as exc:
        raise PlanError(f"Invalid environment template {path}:\n{exc}") from exc


def _load_document(path: Path, file_kind: str) -> dict[str, Any]:
    """Parse a JSON file (by its ``.json`` suffix) or a YAML file into a mapping."""
    text = _read_text(path, file_kind)
    is_json = path.suffix.lower() == ".json"
    try:
        document = json.loads(text) if is_json else yaml.safe_load(text)
    except (json.JSONDecodeError, yaml.YAMLError) as exc:
        syntax = "JSON" if is_json else "YAML"
        raise PlanError(f"The {file_kind} {path} is not valid {syntax}: {exc}") from exc

    if not isinstance(document, dict):
        raise PlanError(f"The {file_kind} {path} must contain a mapping of keys to values.")
    return document


def _read_text(path: Path, file_kind: str) -> str:
    try:
        return path.read_text(encoding="utf-8")
    except FileNotFoundError as exc:
        raise PlanError(f"The {file_kind} {path} was not found. Check the path.") from exc
    except (OSError, UnicodeDecodeError) as exc:
        raise PlanError(f"Cannot read the {file_kind} {path}: {exc}") from exc


def _parameter_value_text(name: object, value: object, path: Path) -> str:
    # Reject booleans explicitly because str(True) would pass as the string "True".
    if isinstance(value, bool) or not isinstance(value, (str, int, float)):
        raise PlanError(
            f"Job parameter {name!r} in {path} has the value {value!r}; a value must be a string or a number."
        )
    return str(value)


def _ordered_steps(job: Job, step_name: Optional[str]) -> list[Step]:
    """Return the job's steps in dependency order, or only the step named ``step_name``."""
    if step_name is None:
        return list(StepDependencyGraph(job=job).topo_sorted())

    for step in job.steps:
        if step.name == step_name:
            return [step]
    names = ", ".join(repr(step.name) for step in job.steps)
    raise PlanError(f"The job has no step named {step_name!r}. Its steps are: {names}.")


def _plan_steps(steps: Sequence[Step]) -> tuple[StepPlan, ...]:
    """Plan each step. Dependencies on steps outside the plan (``--step``) are dropped."""
    names = {step.name for step in steps}
    return tuple(_plan_step(step, names) for step in steps)


def _plan_step(step: Step, planned_names: set[str]) -> StepPlan:
    try:
        task_count = len(_space_iterator(step.parameterSpace))
    except ValueError as exc:
        raise PlanError(f"Invalid parameter space of step {step.name!r}: {exc}") from exc

    return StepPlan(
        name=step.name,
        script=step.script,
        environments=tuple(step.stepEnvironments or ()),
        parameter_space=step.parameterSpace,
        task_count=task_count,
        dependencies=tuple(
            dependency.dependsOn for dependency in step.dependencies or () if dependency.dependsOn in planned_names
        ),
    )


def _space_iterator(space: Optional[StepParameterSpace]) -> StepParameterSpaceIterator:
    # NOTE: adaptive chunking (chunks.targetRuntimeSeconds) is not done. Chunks contain at most
    # chunks.defaultTaskCount values, so the task count is known before the step starts.
    chunk_size: Optional[int] = None
    if space is not None:
        for parameter in space.taskParameterDefinitions.values():
            chunks = getattr(parameter, "chunks", None)
            if chunks is not None:
                chunk_size = int(chunks.defaultTaskCount)
    return StepParameterSpaceIterator(space=space, chunks_task_count_override=chunk_size)


def _extension_name(name: object) -> str:
    # str() of a str-based Enum member is "Class.MEMBER" before Python 3.12, so use its value.
    return str(name.value) if isinstance(name, Enum) else str(name)


def _specification_revision(template: JobTemplate) -> SpecificationRevision:
    """Map a version such as ``jobtemplate-2023-09`` to the revision ``2023-09``."""
    version = str(template.specificationVersion.value)
    return SpecificationRevision(version.split("-", 1)[1])
