"""Path mapping rules: rewrite paths of a source host into paths on this host."""

from __future__ import annotations

import os
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from enum import Enum
from pathlib import PurePath, PurePosixPath, PureWindowsPath

__all__ = ("PathFormat", "PathMappingRule", "map_path", "sort_rules")

_RULE_FIELDS = ("source_path_format", "source_path", "destination_path")
_ACCEPTED_FORMATS = "PathFormat.POSIX or PathFormat.WINDOWS"


class PathFormat(str, Enum):
    """Operating-system family whose path syntax a rule's source path uses."""

    POSIX = "POSIX"
    WINDOWS = "WINDOWS"


def _pure_path_class(path_format: PathFormat) -> type[PurePath]:
    return PurePosixPath if path_format == PathFormat.POSIX else PureWindowsPath


def _separator(path_format: PathFormat) -> str:
    return "/" if path_format == PathFormat.POSIX else "\\"


@dataclass(frozen=True)
class PathMappingRule:
    """A rule that maps paths under ``source_path`` to the same place under ``destination_path``.

    ``source_path`` uses the syntax of ``source_path_format``, so a Windows rule matches paths
    case-insensitively and with either separator. Mapped paths use the syntax of this host.
    """

    source_path_format: PathFormat
    source_path: PurePath
    destination_path: PurePath

    def __init__(
        self,
        *,
        source_path_format: PathFormat,
        source_path: PurePath,
        destination_path: PurePath,
    ) -> None:
        """Create a rule from a format member and pure paths.

        Raises:
            TypeError: ``source_path_format`` is not a ``PathFormat`` member.
            ValueError: ``source_path`` is not the pure path class of ``source_path_format``.
        """
        # A str-based enum compares equal to its value, so only a type check rejects a plain
        # string, which would otherwise be stored as is and break to_dict().
        if not isinstance(source_path_format, PathFormat):
            raise TypeError(
                f"Invalid source_path_format {source_path_format!r}: expected "
                f"{_ACCEPTED_FORMATS}. Convert a string with PathFormat(value.upper()) "
                "or build the rule with PathMappingRule.from_dict()."
            )
        if not isinstance(source_path, _pure_path_class(source_path_format)):
            raise ValueError("Path mapping rule source_path_format does not match source_path type")

        object.__setattr__(self, "source_path_format", source_path_format)
        object.__setattr__(self, "source_path", source_path)
        object.__setattr__(self, "destination_path", destination_path)

    @staticmethod
    def from_dict(rule: dict[str, str]) -> PathMappingRule:
        """Build a rule from the dictionary form used in path-mapping files and job templates.

        ``source_path_format`` is case-insensitive. ``destination_path`` is read as a path of
        this host.

        Raises:
            ValueError: the dictionary is empty, lacks a field, has an extra field, or names
                an unknown format.
            TypeError: ``source_path_format`` is not a string.
        """
        if not rule:
            raise ValueError("Empty path mapping rule")
        if any(field not in rule for field in _RULE_FIELDS):
            raise ValueError(
                f"Path mapping rule requires the following fields: {list(_RULE_FIELDS)}"
            )

        format_name = rule["source_path_format"]
        if not isinstance(format_name, str):
            raise TypeError(
                f"Invalid source_path_format {format_name!r}: expected the string "
                "'POSIX' or 'WINDOWS' (any case)."
            )
        source_path_format = PathFormat(format_name.upper())
        source_path = _pure_path_class(source_path_format)(rule["source_path"])
        destination_path = PurePath(rule["destination_path"])

        extra_fields = set(rule) - set(_RULE_FIELDS)
        if extra_fields:
            raise ValueError(
                f"Unsupported fields for constructing path mapping rule: {extra_fields}"
            )

        return PathMappingRule(
            source_path_format=source_path_format,
            source_path=source_path,
            destination_path=destination_path,
        )

    def to_dict(self) -> dict[str, str]:
        """Return the dictionary form that ``from_dict`` reads."""
        return {
            "source_path_format": self.source_path_format.name,
            "source_path": str(self.source_path),
            "destination_path": str(self.destination_path),
        }

    def apply(self, *, path: str) -> tuple[bool, str]:
        """Map ``path`` if it is ``source_path`` or lies under it.

        Returns ``(True, mapped_path)`` on a match and ``(False, path)`` otherwise. The
        mapped path keeps ``..`` components and a trailing separator of the source syntax,
        which becomes this host's separator.
        """
        parsed = _pure_path_class(self.source_path_format)(path)
        if not parsed.is_relative_to(self.source_path):
            return False, path

        remainder = parsed.parts[len(self.source_path.parts) :]
        mapped = str(PurePath(*self.destination_path.parts, *remainder))
        if path.endswith(_separator(self.source_path_format)):
            mapped += os.sep
        return True, mapped


def map_path(rules: Sequence[PathMappingRule], path: str) -> str:
    """Map ``path`` with the first rule in ``rules`` that matches it, or return it unchanged."""
    for rule in rules:
        matched, mapped = rule.apply(path=path)
        if matched:
            return mapped
    return path


def sort_rules(rules: Iterable[PathMappingRule]) -> list[PathMappingRule]:
    """Return the rules with the most specific source paths first.

    Sorting is stable by descending number of source path components, so among rules of
    equal depth the given order decides which one ``map_path`` tries first.
    """
    return sorted(rules, key=lambda rule: len(rule.source_path.parts), reverse=True)
