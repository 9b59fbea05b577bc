"""`mtlsproxy --help`: every option of every verb says what it is and, when it has one,
its default."""

from __future__ import annotations

import argparse
from collections.abc import Iterator
from pathlib import Path

from mtlsproxy.cli import _parser

Found = tuple[str, argparse.ArgumentParser, argparse.Action]


def options(parser: argparse.ArgumentParser, verb: str = "mtlsproxy") -> Iterator[Found]:
    """Every option and positional argument of the whole parser tree, with its verb."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from options(sub, f"{verb} {name}")
        elif not isinstance(action, argparse._HelpAction | argparse._VersionAction):
            yield verb, parser, action


def verbs(parser: argparse.ArgumentParser, verb: str = "mtlsproxy") -> Iterator[tuple[str, str]]:
    """Every verb with the help text it shows in its parent's list."""
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            shown = {a.dest: a.help or "" for a in action._get_subactions()}
            for name, sub in action.choices.items():
                yield f"{verb} {name}", shown.get(name, "")
                yield from verbs(sub, f"{verb} {name}")


def test_every_option_has_help_that_states_its_default() -> None:
    parser = _parser()
    found = list(options(parser))
    walked = {verb for verb, _, _ in found}
    assert {"mtlsproxy quickstart", "mtlsproxy deny remove", "mtlsproxy reload"} <= walked
    assert {"mtlsproxy ca renew", "mtlsproxy client renew"} <= walked  # cli_lifecycle too
    missing, no_default = [], []
    for verb, sub, action in found:
        name = action.option_strings[0] if action.option_strings else action.dest
        if not action.help or action.help == argparse.SUPPRESS:
            missing.append(f"{verb} {name}")
            continue
        text = sub._get_formatter()._expand_help(action)
        default = action.default
        if default is None or default is False or default == [] or default == argparse.SUPPRESS:
            continue
        # Durations are stored in seconds and shown as written (24h): "default" must be
        # there; a string, path or number must be shown as it is.
        shown = "default" in text.lower()
        if isinstance(default, str | int | Path) and not isinstance(default, bool):
            shown = shown and str(default) in text
        if not shown:
            no_default.append(f"{verb} {name} (default {default!r}): {text!r}")
    assert not missing, "options without help: " + ", ".join(missing)
    assert not no_default, "help that does not state the default:\n" + "\n".join(no_default)


def test_every_verb_has_help() -> None:
    silent = [verb for verb, text in verbs(_parser()) if not text]
    assert not silent, silent
