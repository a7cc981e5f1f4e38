"""Tests for the ``openjd_*`` line parser, redaction candidates and the redactor."""

from __future__ import annotations

import logging
import random
import sys
import threading

import pytest

from openjd.sessions._messages import (
    Fail,
    LogLevel,
    Message,
    MessageError,
    Progress,
    Redactor,
    SetEnv,
    Status,
    UnsetEnv,
    parse_line,
    redaction_candidates,
)

PROGRESS_ERROR = "Progress must be a floating point value between 0.0 and 100.0, inclusive."
NAME_RULE = (
    "must start with a letter or underscore and contain only letters, digits and underscores"
)

VALID_MESSAGES: list[tuple[str, Message]] = [
    ("openjd_progress: 10", Progress(10.0)),
    ("openjd_progress: 10.5", Progress(10.5)),
    ("openjd_progress:  20 ", Progress(20.0)),
    ("openjd_progress: 1e1", Progress(10.0)),
    ("openjd_progress: +5", Progress(5.0)),
    ("openjd_progress: 0", Progress(0.0)),
    ("openjd_progress: 100", Progress(100.0)),
    ("openjd_status: working", Status("working")),
    ("openjd_status:   spaced out  ", Status("  spaced out  ")),
    ("openjd_status: a: b", Status("a: b")),
    ("openjd_fail: it broke", Fail("it broke")),
    ("openjd_env: FOO=bar", SetEnv("FOO", "bar", False, "bar")),
    ("openjd_env: A=x=y", SetEnv("A", "x=y", False, "x=y")),
    ("openjd_env: B=", SetEnv("B", "", False, "")),
    ("openjd_env:  Q=lead", SetEnv("Q", "lead", False, "lead")),
    ("openjd_env: _U9=trailing  ", SetEnv("_U9", "trailing  ", False, "trailing  ")),
    ('openjd_env: "BAR=json\\tval"', SetEnv("BAR", "json\tval", False, 'json\\tval"')),
    ('openjd_env: "B="', SetEnv("B", "", False, '"')),
    ('openjd_env: "Q=\\"quoted\\""  ', SetEnv("Q", '"quoted"', False, '\\"quoted\\""  ')),
    (
        'openjd_env: "M=multi\\nline\\nvalue"',
        SetEnv("M", "multi\nline\nvalue", False, 'multi\\nline\\nvalue"'),
    ),
    ("openjd_redacted_env: FOO=s3cr3t", SetEnv("FOO", "s3cr3t", True, "s3cr3t")),
    (
        'openjd_redacted_env: "BAR=multi\\nline\\nvalue"',
        SetEnv("BAR", "multi\nline\nvalue", True, 'multi\\nline\\nvalue"'),
    ),
    ("openjd_unset_env: FOO", UnsetEnv("FOO")),
    ("openjd_unset_env:   _Leading", UnsetEnv("_Leading")),
    ("openjd_session_runtime_loglevel: DEBUG", LogLevel(logging.DEBUG, "DEBUG")),
    ("openjd_session_runtime_loglevel: info", LogLevel(logging.INFO, "INFO")),
    ("openjd_session_runtime_loglevel:  Warning ", LogLevel(logging.WARNING, "WARNING")),
    ("openjd_session_runtime_loglevel: ERROR", LogLevel(logging.ERROR, "ERROR")),
]

ORDINARY_LINES = [
    "",
    "o",
    " ",
    "hello world",
    "ok, openjd_env: X=1 is mentioned here",
    "openjd_",
    "openjd_progress:40",
    "  openjd_progress: 30",
    "OPENJD_STATUS: x",
    "Openjd_progress: 5",
    "openjd_status: ",
    "openjd_status:",
    "openjd_unknown: x",
    "openjd_environment is ready",
    "openjd_environment is here",
    "openjd_envy: X=1",
    "  openjd_unset_environment: X",
    "openjd_env_var: X=1",
]

# (line, kind, part of the message)
MALFORMED_MESSAGES = [
    ("openjd_progress: 101", "progress", PROGRESS_ERROR),
    ("openjd_progress: -1", "progress", PROGRESS_ERROR),
    ("openjd_progress: abc", "progress", PROGRESS_ERROR),
    ("openjd_progress: nan", "progress", PROGRESS_ERROR),
    ("openjd_progress: inf", "progress", PROGRESS_ERROR),
    (
        "openjd_session_runtime_loglevel: bogus ",
        "session_runtime_loglevel",
        "Unknown log level: BOGUS. Known values: DEBUG,INFO,WARNING,ERROR",
    ),
]

MALFORMED_ENV_MESSAGES = [
    ("openjd_env: 1FOO=bar", "env", f'the variable name "1FOO" {NAME_RULE}.'),
    ("openjd_env: HAS-DASH=x", "env", f'the variable name "HAS-DASH" {NAME_RULE}.'),
    ("openjd_env: FOO bar=1", "env", f'the variable name "FOO bar" {NAME_RULE}.'),
    ("openjd_env: =x", "env", f'the variable name "" {NAME_RULE}.'),
    ("openjd_env: NO_EQUALS", "env", '"NO_EQUALS" contains no "="'),
    ('openjd_env: "UNTERMINATED=abc', "env", "the JSON string has no closing double quote"),
    ('openjd_env: "FOO=x" trailing', "env", "unexpected text after the closing double quote"),
    ('openjd_env: "A=\\q"', "env", "the JSON string is invalid (Invalid \\escape"),
    ('openjd_env: "NOEQ"', "env", '"NOEQ" contains no "="'),
    ('openjd_env: "1FOO=bar"', "env", f'the variable name "1FOO" {NAME_RULE}.'),
    ("openjd_redacted_env: 1FOO=bar", "redacted_env", f"the variable name {NAME_RULE}."),
    ("openjd_redacted_env: NO_EQUALS", "redacted_env", 'the value contains no "="'),
    ('openjd_redacted_env: "FOO=abc', "redacted_env", "no closing double quote"),
    ("openjd_unset_env: TWO WORDS", "unset_env", '"TWO WORDS" is not a variable name'),
    ("openjd_unset_env: X ", "unset_env", '"X " is not a variable name'),
    ("openjd_unset_env: 9X", "unset_env", '"9X" is not a variable name'),
    ("Openjd_env: X=1", "env", 'in "Openjd_env: X=1": print it at the start of the line'),
    (" openjd_env: X=1", "env", 'in " openjd_env: X=1": print it at the start of the line'),
    ("openjd_env:X=1", "env", "with one space after the colon"),
    ("openjd_env :X=1", "env", "with one space after the colon"),
    ("openjd_env:\tX=1", "env", "with one space after the colon"),
    ("\topenjd_unset_env: X", "unset_env", "at the start of the line"),
    ("\u3000openjd_env: X=1", "env", "at the start of the line"),
    ("OPENJD_UNSET_ENV: X", "unset_env", 'as in "openjd_unset_env: NAME"'),
    ("OPENJD_REDACTED_ENV: X=1", "redacted_env", "in lower case"),
    ("openjd_env: ", "env", 'nothing follows the colon. Write "openjd_env: NAME=value".'),
    ("openjd_unset_env:", "unset_env", "nothing follows the colon"),
]


@pytest.mark.parametrize(("line", "expected"), VALID_MESSAGES)
def test_parse_line_valid_message(line: str, expected: Message) -> None:
    assert parse_line(line) == expected


@pytest.mark.parametrize("line", ORDINARY_LINES)
def test_parse_line_ordinary_output(line: str) -> None:
    assert parse_line(line) is None


@pytest.mark.parametrize(("line", "kind", "text"), MALFORMED_MESSAGES)
def test_parse_line_malformed_message(line: str, kind: str, text: str) -> None:
    with pytest.raises(MessageError) as caught:
        parse_line(line)

    assert str(caught.value) == text
    assert caught.value.kind == kind
    assert caught.value.is_env is False


@pytest.mark.parametrize(("line", "kind", "text"), MALFORMED_ENV_MESSAGES)
def test_parse_line_malformed_env_message(line: str, kind: str, text: str) -> None:
    with pytest.raises(MessageError) as caught:
        parse_line(line)

    assert str(caught.value).startswith(f"Invalid openjd_{kind} message")
    assert text in str(caught.value)
    assert caught.value.kind == kind
    assert caught.value.is_env is True


def test_malformed_env_exact_message() -> None:
    with pytest.raises(MessageError) as caught:
        parse_line("openjd_env: 1FOO=bar")

    assert str(caught.value) == (
        'Invalid openjd_env message: the variable name "1FOO" must start with a letter or '
        "underscore and contain only letters, digits and underscores."
    )


def test_message_error_is_value_error() -> None:
    with pytest.raises(ValueError):
        parse_line("openjd_progress: 200")


@pytest.mark.parametrize(
    "line",
    [
        "openjd_redacted_env: my secret=hunter2",
        "openjd_redacted_env: hunter2",
        'openjd_redacted_env: "hunter2',
        'openjd_redacted_env: "X=hunter2" hunter2',
        " openjd_redacted_env: X=hunter2",
        "OPENJD_REDACTED_ENV:hunter2",
    ],
)
def test_malformed_redacted_env_hides_payload(line: str) -> None:
    with pytest.raises(MessageError) as caught:
        parse_line(line)

    assert "hunter2" not in str(caught.value)
    assert caught.value.kind == "redacted_env"


def test_long_payload_shortened_in_error() -> None:
    with pytest.raises(MessageError) as caught:
        parse_line("openjd_env: " + "x" * 10_000)

    assert len(str(caught.value)) < 200
    assert '"xxxxxxxx' in str(caught.value)


def test_candidate_first_chars_cover_whitespace() -> None:
    # A line can only be an env attempt after whitespace that str.lstrip removes, so the
    # quick first-character check must know every such character.
    for code in range(sys.maxunicode + 1):
        char = chr(code)
        if char.isspace():
            with pytest.raises(MessageError):
                parse_line(char + "openjd_env: X=1")


@pytest.mark.parametrize(
    ("line", "expected"),
    [
        ("openjd_redacted_env: FOO=s3cr3t", ["s3cr3t"]),
        ("openjd_redacted_env:    FOO=lead", ["lead"]),
        ("openjd_redacted_env: FOO=a=b ", ["a=b "]),
        (
            'openjd_redacted_env: "BAR=multi\\nline\\nvalue"',
            ['multi\\nline\\nvalue"', "multi\nline\nvalue"],
        ),
        ('openjd_redacted_env: "BAR=plain"', ['plain"', "plain"]),
        ("openjd_redacted_env: NOEQUALS", ["NOEQUALS"]),
        ("openjd_redacted_env: 1FOO=bar", ["bar"]),
        ("openjd_redacted_env: my secret=value", ["value"]),
        ('openjd_redacted_env: "FOO=unterminated', ["unterminated"]),
        ('openjd_redacted_env: "FOO=x" trailing', ['x" trailing', "x"]),
        ("openjd_redacted_env: FOO=", []),
        ('openjd_redacted_env: FOO="', ['"']),
        ('openjd_redacted_env: "FOO="', []),
        ('openjd_redacted_env: "FOO=" ', []),
        (" openjd_redacted_env: X=secret", ["secret"]),
        ("OPENJD_REDACTED_ENV:X=secret", ["secret"]),
        ("openjd_redacted_env:   ", []),
        ("openjd_env: FOO=bar", []),
        ("openjd_redacted_environment=abc", []),
        ("ordinary output", []),
    ],
)
def test_redaction_candidates_table(line: str, expected: list[str]) -> None:
    assert redaction_candidates(line) == expected


def make_redactor(*lines: str) -> Redactor:
    redactor = Redactor()
    for line in lines:
        for candidate in redaction_candidates(line):
            redactor.add(candidate)
    return redactor


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("openjd_redacted_env: FOO=s3cr3t", "openjd_redacted_env: FOO=********"),
        ("the secret is s3cr3t and s3cr3ts3cr3t", "the secret is ******** and ********"),
        ('openjd_redacted_env: "BAR=multi\\nline\\nvalue"', 'openjd_redacted_env: "BAR=********'),
        ("line", "********"),
        ("multi", "********"),
        ("value", "********"),
        ("xx multi yy", "xx ******** yy"),
        ("a line here", "a line here"),
        ("multi\nline\nvalue", "********"),
        ("top\nline\nend", "top\n********\nend"),
        ("openjd_status: s3cr3t status", "openjd_status: ******** status"),
        ("nothing secret here", "nothing secret here"),
    ],
)
def test_redactor_spec_table(text: str, expected: str) -> None:
    redactor = make_redactor(
        "openjd_redacted_env: FOO=s3cr3t",
        'openjd_redacted_env: "BAR=multi\\nline\\nvalue"',
    )

    assert redactor.redact(text) == expected


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("abc abd", "******** ********d"),
        ("abbc", "********"),
        ("xbcab", "x********"),
        ("a b c", "a b c"),
    ],
)
def test_redactor_overlapping_values(text: str, expected: str) -> None:
    redactor = Redactor()
    redactor.add("ab")
    redactor.add("bc")

    assert redactor.redact(text) == expected


def test_redactor_nested_values_longest() -> None:
    redactor = Redactor()
    redactor.add("secret")
    redactor.add("cre")
    redactor.add("secretive")

    assert redactor.redact("a secretive cre") == "a ******** ********"


def test_redactor_keeps_percent_signs() -> None:
    redactor = Redactor()
    redactor.add("s3cr3t")

    assert redactor.redact("100%% of s3cr3t %s %d") == "100%% of ******** %s %d"


def test_redactor_escapes_regex_characters() -> None:
    redactor = Redactor()
    redactor.add("a.b*")

    assert redactor.redact("axb a.b* a.bbb") == "axb ******** a.bbb"


def test_redactor_empty_registers_nothing() -> None:
    redactor = Redactor()
    redactor.add("")

    assert redactor.active is False
    assert redactor.redact("") == ""
    assert redactor.redact("text") == "text"


def test_redactor_active_after_add() -> None:
    redactor = Redactor()
    assert redactor.active is False

    redactor.add("x\n\ny")

    assert redactor.active is True
    assert redactor.redact("x") == "********"
    assert redactor.redact("") == ""
    assert redactor.redact("y and x\n\ny") == "******** and ********"


def test_redactor_middle_lines_only_whole() -> None:
    redactor = Redactor()
    redactor.add("first\na\nlast")

    assert redactor.redact("a") == "********"
    assert redactor.redact("a cat") == "a cat"
    assert redactor.redact("the first one") == "the ******** one"


def mask_by_characters(values: list[str], whole_lines: set[str], text: str) -> str:
    """Mask ``text`` the slow way: mark every covered character, then mask each run."""
    covered = [False] * len(text)
    for value in values:
        for start in range(len(text) - len(value) + 1):
            if text.startswith(value, start):
                covered[start : start + len(value)] = [True] * len(value)
    start = 0
    for line in text.split("\n"):
        if line in whole_lines:
            covered[start : start + len(line)] = [True] * len(line)
        start += len(line) + 1
    pieces = []
    for index, character in enumerate(text):
        if not covered[index]:
            pieces.append(character)
        elif index == 0 or not covered[index - 1]:
            pieces.append("********")
    return "".join(pieces)


def test_redactor_matches_character_mask() -> None:
    generator = random.Random(20240611)
    for _ in range(300):
        redactor = Redactor()
        values: list[str] = []
        whole_lines: set[str] = set()
        for _ in range(generator.randint(1, 6)):
            secret = "".join(generator.choice("abc\n") for _ in range(generator.randint(1, 5)))
            redactor.add(secret)
            pieces = secret.split("\n")
            values.extend(piece for piece in {secret, pieces[0], pieces[-1]} if piece)
            if len(pieces) > 2:
                whole_lines.update(piece for piece in pieces[1:-1] if piece)
        text = "".join(generator.choice("abcd\n") for _ in range(generator.randint(0, 40)))

        assert redactor.redact(text) == mask_by_characters(values, whole_lines, text), (values, text)


def test_redactor_repeated_value_each_masked() -> None:
    redactor = Redactor()
    redactor.add("s3")

    assert redactor.redact("s3 x s3 y s3s3") == "******** x ******** y ********"
    assert redactor.redact("ss33") == "s********3"


def test_redactor_concurrent_add_and_redact() -> None:
    redactor = Redactor()
    errors: list[BaseException] = []
    stop = threading.Event()

    text = "tok000x and tok059x"
    allowed = {text, "******** and tok059x", "******** and ********"}

    def read() -> None:
        try:
            while not stop.is_set():
                assert redactor.redact(text) in allowed
        except BaseException as error:
            errors.append(error)

    readers = [threading.Thread(target=read) for _ in range(2)]
    for reader in readers:
        reader.start()
    for index in range(60):
        redactor.add(f"tok{index:03d}x")
    stop.set()
    for reader in readers:
        reader.join(timeout=30)

    assert errors == []
    assert redactor.redact(text) == "******** and ********"


def test_parse_then_redact_malformed_secret() -> None:
    line = "openjd_redacted_env: bad name=hunter2"
    redactor = make_redactor(line)

    with pytest.raises(MessageError):
        parse_line(line)
    assert redactor.redact(line) == "openjd_redacted_env: bad name=********"


def test_set_env_raw_value_matches_candidates() -> None:
    line = 'openjd_redacted_env: "KEY=a\\tb"'
    message = parse_line(line)

    assert isinstance(message, SetEnv)
    assert message.raw_value in redaction_candidates(line)
    assert message.value in redaction_candidates(line)
