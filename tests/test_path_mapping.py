from __future__ import annotations

import dataclasses
import sys
from pathlib import PurePath, PurePosixPath, PureWindowsPath
from typing import Any

import pytest

from openjd.sessions._path_mapping import PathFormat, PathMappingRule, map_path, sort_rules

posix_host_only = pytest.mark.skipif(
    sys.platform == "win32", reason="expected results use POSIX host path syntax"
)

POSIX_RULE = PathMappingRule(
    source_path_format=PathFormat.POSIX,
    source_path=PurePosixPath("/a/b"),
    destination_path=PurePosixPath("/mnt/x"),
)
WINDOWS_RULE = PathMappingRule(
    source_path_format=PathFormat.WINDOWS,
    source_path=PureWindowsPath("C:\\Users\\me"),
    destination_path=PurePosixPath("/home/me"),
)


def posix_rule(source: str, destination: str) -> PathMappingRule:
    return PathMappingRule(
        source_path_format=PathFormat.POSIX,
        source_path=PurePosixPath(source),
        destination_path=PurePosixPath(destination),
    )


# --- apply() ----------------------------------------------------------------------------


@posix_host_only
@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("/a/b", (True, "/mnt/x")),
        ("/a/b/", (True, "/mnt/x/")),
        ("/a/b/c/d", (True, "/mnt/x/c/d")),
        ("/a/b/c/", (True, "/mnt/x/c/")),
        ("/a/bc", (False, "/a/bc")),
        ("/a/b/../c", (True, "/mnt/x/../c")),
        ("a/b", (False, "a/b")),
        ("/a/b//c/./d", (True, "/mnt/x/c/d")),
        ("/a", (False, "/a")),
        ("/", (False, "/")),
        ("", (False, "")),
        ("/a/b\\c", (False, "/a/b\\c")),
        ("/A/B", (False, "/A/B")),
    ],
)
def test_apply_posix_rule_cases(path: str, expected: tuple[bool, str]) -> None:
    assert POSIX_RULE.apply(path=path) == expected


@posix_host_only
@pytest.mark.parametrize(
    ("path", "expected"),
    [
        ("c:\\users\\ME\\f.txt", (True, "/home/me/f.txt")),
        ("C:/Users/me/f.txt", (True, "/home/me/f.txt")),
        ("C:\\Users\\me\\", (True, "/home/me/")),
        ("C:\\Users\\me", (True, "/home/me")),
        # Only the Windows separator counts as a trailing separator of a Windows path.
        ("C:\\Users\\me/", (True, "/home/me")),
        ("C:\\Users\\meh", (False, "C:\\Users\\meh")),
        ("D:\\Users\\me", (False, "D:\\Users\\me")),
        ("Users\\me", (False, "Users\\me")),
    ],
)
def test_apply_windows_rule_cases(path: str, expected: tuple[bool, str]) -> None:
    assert WINDOWS_RULE.apply(path=path) == expected


@posix_host_only
@pytest.mark.parametrize(
    ("rule", "path", "expected"),
    [
        (posix_rule("/", "/mnt"), "/", (True, "/mnt/")),
        (posix_rule("/", "/mnt"), "/x/y/", (True, "/mnt/x/y/")),
        (posix_rule("/a", "rel"), "/a/b", (True, "rel/b")),
        (posix_rule("/a", ""), "/a", (True, ".")),
        (posix_rule("a", "/m"), "a/b", (True, "/m/b")),
        (
            PathMappingRule(
                source_path_format=PathFormat.WINDOWS,
                source_path=PureWindowsPath("\\\\srv\\share"),
                destination_path=PurePosixPath("/mnt/share"),
            ),
            "//srv/share/a",
            (True, "/mnt/share/a"),
        ),
        (
            PathMappingRule(
                source_path_format=PathFormat.WINDOWS,
                source_path=PureWindowsPath("C:\\"),
                destination_path=PurePosixPath("/c"),
            ),
            "C:\\x\\y",
            (True, "/c/x/y"),
        ),
    ],
)
def test_apply_edge_rule_cases(
    rule: PathMappingRule, path: str, expected: tuple[bool, str]
) -> None:
    assert rule.apply(path=path) == expected


def test_apply_path_keyword_only() -> None:
    with pytest.raises(TypeError):
        POSIX_RULE.apply("/a/b")  # type: ignore[call-arg]


# --- __init__ ---------------------------------------------------------------------------


def test_init_stores_given_values() -> None:
    destination = PureWindowsPath("D:\\x")
    rule = PathMappingRule(
        source_path_format=PathFormat.POSIX,
        source_path=PurePosixPath("/a"),
        destination_path=destination,
    )

    assert rule.source_path_format is PathFormat.POSIX
    assert rule.source_path == PurePosixPath("/a")
    # destination_path is not validated against any flavour.
    assert rule.destination_path is destination


def test_init_rejects_positional_arguments() -> None:
    with pytest.raises(TypeError):
        PathMappingRule(  # type: ignore[call-arg]
            PathFormat.POSIX, PurePosixPath("/a"), PurePosixPath("/b")
        )


@pytest.mark.parametrize(
    ("path_format", "source_path"),
    [
        (PathFormat.POSIX, PureWindowsPath("C:\\a")),
        (PathFormat.WINDOWS, PurePosixPath("/a")),
    ],
)
def test_init_format_path_mismatch(path_format: PathFormat, source_path: PurePath) -> None:
    with pytest.raises(ValueError) as excinfo:
        PathMappingRule(
            source_path_format=path_format,
            source_path=source_path,
            destination_path=PurePosixPath("/b"),
        )

    assert str(excinfo.value) == (
        "Path mapping rule source_path_format does not match source_path type"
    )


@pytest.mark.parametrize(
    ("path_format", "source_path"),
    [
        ("POSIX", PurePosixPath("/a")),
        ("posix", PurePosixPath("/a")),
        ("posix", PureWindowsPath("C:\\a")),
        ("WINDOWS", PureWindowsPath("C:\\a")),
        (None, PurePosixPath("/a")),
        (1, PurePosixPath("/a")),
    ],
)
def test_init_rejects_non_enum_format(path_format: Any, source_path: PurePath) -> None:
    with pytest.raises((TypeError, ValueError)) as excinfo:
        PathMappingRule(
            source_path_format=path_format,
            source_path=source_path,
            destination_path=PurePosixPath("/b"),
        )

    message = str(excinfo.value)
    assert repr(path_format) in message
    assert "PathFormat.POSIX" in message
    assert "PathFormat.WINDOWS" in message


# --- dataclass behaviour ----------------------------------------------------------------


def test_rule_is_frozen() -> None:
    with pytest.raises(dataclasses.FrozenInstanceError):
        POSIX_RULE.source_path = PurePosixPath("/z")  # type: ignore[misc]


def test_rule_equality_and_hash() -> None:
    same = posix_rule("/a/b", "/mnt/x")
    other = posix_rule("/a/b", "/mnt/y")

    assert same == POSIX_RULE
    assert hash(same) == hash(POSIX_RULE)
    assert other != POSIX_RULE
    assert len({same, POSIX_RULE, other}) == 2


def test_rule_repr_is_dataclass_repr() -> None:
    assert repr(posix_rule("/a", "/b")) == (
        "PathMappingRule(source_path_format=<PathFormat.POSIX: 'POSIX'>, "
        "source_path=PurePosixPath('/a'), destination_path=PurePosixPath('/b'))"
    )


def test_rule_dataclass_fields_order() -> None:
    assert [field.name for field in dataclasses.fields(PathMappingRule)] == [
        "source_path_format",
        "source_path",
        "destination_path",
    ]


# --- from_dict() / to_dict() ------------------------------------------------------------


@pytest.mark.parametrize(
    ("format_name", "expected_format", "path_class"),
    [
        ("POSIX", PathFormat.POSIX, PurePosixPath),
        ("posix", PathFormat.POSIX, PurePosixPath),
        ("Windows", PathFormat.WINDOWS, PureWindowsPath),
        ("WINDOWS", PathFormat.WINDOWS, PureWindowsPath),
    ],
)
def test_from_dict_valid_formats(
    format_name: str, expected_format: PathFormat, path_class: type[PurePath]
) -> None:
    rule = PathMappingRule.from_dict(
        {"source_path_format": format_name, "source_path": "/src", "destination_path": "/dst"}
    )

    assert rule.source_path_format is expected_format
    assert type(rule.source_path) is path_class
    assert rule.source_path == path_class("/src")
    assert type(rule.destination_path) is type(PurePath())
    assert rule.destination_path == PurePath("/dst")


REQUIRED_FIELDS_MESSAGE = (
    "Path mapping rule requires the following fields: "
    "['source_path_format', 'source_path', 'destination_path']"
)


@pytest.mark.parametrize(
    ("rule", "message"),
    [
        ({}, "Empty path mapping rule"),
        (None, "Empty path mapping rule"),
        ({"source_path_format": "posix"}, REQUIRED_FIELDS_MESSAGE),
        ({"source_path_format": "posix", "source_path": "/a"}, REQUIRED_FIELDS_MESSAGE),
        ({"source_path": "/a", "destination_path": "/b"}, REQUIRED_FIELDS_MESSAGE),
        (
            {"source_path_format": "mac", "source_path": "/a", "destination_path": "/b"},
            "'MAC' is not a valid PathFormat",
        ),
        (
            {
                "source_path_format": "posix",
                "source_path": "/a",
                "destination_path": "/b",
                "x": "1",
            },
            "Unsupported fields for constructing path mapping rule: {'x'}",
        ),
        # The format is converted before extra fields are checked.
        (
            {"source_path_format": "mac", "source_path": "/a", "destination_path": "/b", "x": "1"},
            "'MAC' is not a valid PathFormat",
        ),
    ],
)
def test_from_dict_invalid_rules(rule: Any, message: str) -> None:
    with pytest.raises(ValueError) as excinfo:
        PathMappingRule.from_dict(rule)

    assert str(excinfo.value) == message


def test_from_dict_lists_all_extra_fields() -> None:
    rule = {
        "source_path_format": "posix",
        "source_path": "/a",
        "destination_path": "/b",
        "x": "1",
        "y": "2",
    }

    with pytest.raises(ValueError) as excinfo:
        PathMappingRule.from_dict(rule)

    prefix = "Unsupported fields for constructing path mapping rule: "
    message = str(excinfo.value)
    assert message.startswith(prefix)
    assert message[len(prefix) :] in ("{'x', 'y'}", "{'y', 'x'}")


def test_from_dict_non_string_format() -> None:
    rule: Any = {"source_path_format": 1, "source_path": "/a", "destination_path": "/b"}

    with pytest.raises(TypeError) as excinfo:
        PathMappingRule.from_dict(rule)

    assert "1" in str(excinfo.value)
    assert "POSIX" in str(excinfo.value)
    assert "WINDOWS" in str(excinfo.value)


@posix_host_only
def test_to_dict_uses_format_name() -> None:
    assert POSIX_RULE.to_dict() == {
        "source_path_format": "POSIX",
        "source_path": "/a/b",
        "destination_path": "/mnt/x",
    }
    assert WINDOWS_RULE.to_dict() == {
        "source_path_format": "WINDOWS",
        "source_path": "C:\\Users\\me",
        "destination_path": "/home/me",
    }


@posix_host_only
@pytest.mark.parametrize("rule", [POSIX_RULE, WINDOWS_RULE])
def test_to_dict_round_trip(rule: PathMappingRule) -> None:
    assert PathMappingRule.from_dict(rule.to_dict()) == rule


# --- map_path() / sort_rules() ----------------------------------------------------------


@posix_host_only
def test_map_path_first_match_wins() -> None:
    rules = [posix_rule("/a", "/first"), posix_rule("/a/b", "/second")]

    assert map_path(rules, "/a/b/c") == "/first/b/c"
    assert map_path(list(reversed(rules)), "/a/b/c") == "/second/c"


@posix_host_only
def test_map_path_no_match_unchanged() -> None:
    assert map_path([POSIX_RULE, WINDOWS_RULE], "/other/path/") == "/other/path/"
    assert map_path([], "/a/b") == "/a/b"
    assert map_path([POSIX_RULE, WINDOWS_RULE], "C:\\Users\\me\\x") == "/home/me/x"


def test_sort_rules_deepest_first_stable() -> None:
    shallow_first = posix_rule("/a", "/1")
    deep = posix_rule("/a/b/c", "/2")
    middle = posix_rule("/a/b", "/3")
    shallow_second = posix_rule("/z", "/4")
    windows_middle = PathMappingRule(
        source_path_format=PathFormat.WINDOWS,
        source_path=PureWindowsPath("C:\\x\\y"),
        destination_path=PurePosixPath("/5"),
    )
    rules = [shallow_first, deep, middle, shallow_second, windows_middle]

    result = sort_rules(rules)

    # PureWindowsPath("C:\\x\\y").parts is ("C:\\", "x", "y"), so it ties with /a/b.
    assert result == [deep, middle, windows_middle, shallow_first, shallow_second]
    assert rules == [shallow_first, deep, middle, shallow_second, windows_middle]
    assert result is not rules


def test_sort_rules_empty_input() -> None:
    assert sort_rules([]) == []
