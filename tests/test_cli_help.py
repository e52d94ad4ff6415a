"""`plerec --help`: every option of every command explains itself, shows its default, and every command's
help ends with examples that parse as written."""

import argparse
import shlex
from pathlib import Path

import pytest

from plerec.cli import _parser

ROOT = Path(__file__).resolve().parents[1]


def _commands() -> dict[str, argparse.ArgumentParser]:
    parser = _parser()
    (sub,) = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]
    return {"plerec": parser, **sub.choices}


COMMANDS = _commands()


def _examples(parser: argparse.ArgumentParser) -> list[str]:
    return [line.strip() for line in (parser.epilog or "").splitlines() if line.strip().startswith("plerec ")]


def _shown(parser: argparse.ArgumentParser) -> str:
    return " ".join(parser.format_help().split())  # argparse wraps lines: compare words, not line breaks


@pytest.mark.parametrize("name", COMMANDS)
def test_every_option_has_help(name):
    parser = COMMANDS[name]
    silent = [
        a.dest
        for a in parser._actions
        if not isinstance(a, argparse._HelpAction) and (not a.help or a.help == argparse.SUPPRESS)
    ]
    assert silent == []


@pytest.mark.parametrize("name", COMMANDS)
def test_help_shows_every_default_and_no_default_none(name):
    parser = COMMANDS[name]
    shown = _shown(parser)
    for action in parser._actions:
        default = action.default
        if default is None or default is False or default is argparse.SUPPRESS or default == []:
            continue
        assert f"(default: {default})" in shown, (action.dest, shown)
    assert "(default: None)" not in shown and "(default: False)" not in shown and "(default: [])" not in shown


@pytest.mark.parametrize("name", [n for n in COMMANDS if n != "plerec"])
def test_help_ends_with_an_example(name):
    lines = COMMANDS[name].format_help().rstrip().splitlines()
    assert lines[-1].strip().startswith(f"plerec {name}"), lines[-1]
    assert any(line.strip().startswith("example") for line in lines)


@pytest.mark.parametrize(
    ("name", "example"), [(n, e) for n, p in COMMANDS.items() for e in _examples(p)], ids=lambda v: str(v)[:40]
)
def test_every_example_parses_and_names_files_that_exist(name, example):
    words = shlex.split(example)
    assert words[0] == "plerec"
    args = _parser().parse_args(words[1:])  # argparse exits on an error: the test fails with SystemExit
    assert args.command == (words[1] if name == "plerec" else name)
    for word in words:
        if word.startswith("examples/"):  # the example experiments ship with the repository
            assert (ROOT / word).is_file(), word


def test_the_top_level_help_lists_every_command():
    shown = COMMANDS["plerec"].format_help()
    for name in COMMANDS:
        if name != "plerec":
            assert f"    {name}" in shown, name
