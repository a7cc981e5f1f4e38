"""Symbol tables that format strings of actions resolve against."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Optional

from openjd.model import ParameterValue, ParameterValueType, SpecificationRevision, SymbolTable

from ._path_mapping import PathMappingRule, map_path

__all__ = ("build_symbol_table", "uses_path_mapping_file")

PATH_MAPPING_FILE_SYMBOL = "Session.PathMappingRulesFile"


def _add_parameters(
    table: dict[str, str],
    prefix: str,
    values: Mapping[str, ParameterValue],
    rules: Sequence[PathMappingRule],
) -> None:
    for name, parameter in values.items():
        raw = str(parameter.value)
        table[f"{prefix}RawParam.{name}"] = raw
        if parameter.type == ParameterValueType.PATH and rules:
            table[f"{prefix}Param.{name}"] = map_path(rules, raw)
        else:
            table[f"{prefix}Param.{name}"] = raw


def build_symbol_table(
    *,
    revision: SpecificationRevision,
    working_directory: Path,
    job_parameters: Mapping[str, ParameterValue],
    task_parameters: Optional[Mapping[str, ParameterValue]],
    rules: Sequence[PathMappingRule],
) -> SymbolTable:
    """Build the symbols of one action: session, job parameter and task parameter values.

    ``PATH`` parameters resolve through the path-mapping rules under ``Param.`` and
    ``Task.Param.``; the ``RawParam`` forms keep the value as given.
    """
    if revision != SpecificationRevision.v2023_09:
        raise NotImplementedError(f"Schema version {revision.value} is not supported.")
    table: dict[str, str] = {"Session.WorkingDirectory": str(working_directory)}
    _add_parameters(table, "", job_parameters, rules)
    if task_parameters:
        _add_parameters(table, "Task.", task_parameters, rules)
    return SymbolTable(source=table)


def uses_path_mapping_file(texts: Sequence[str]) -> bool:
    """Tell whether any of the format strings refers to the path-mapping rules file."""
    return any(PATH_MAPPING_FILE_SYMBOL in text for text in texts)
