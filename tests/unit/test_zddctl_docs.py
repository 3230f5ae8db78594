"""zddctl's documentation in step with its parser: every command and option of `zddctl --help`
is in zddctl(1) (packaging/man/zddctl.1), the one reference the README links to."""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest

from zddd.cli import build_parser

REPO = Path(__file__).resolve().parents[2]


def parser_words() -> list[str]:
    parser = build_parser()
    words = [s for a in parser._actions for s in a.option_strings]
    sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
    for name, subparser in sub.choices.items():
        words.append(name)
        words += [s for a in subparser._actions for s in a.option_strings]
    return sorted(set(words) - {"-h", "--help"})


def man_text() -> str:
    # roff: \- is a hyphen, \f? font changes
    text = (REPO / "packaging/man/zddctl.1").read_text()
    return re.sub(r"\\f[BIRP]", "", text.replace("\\-", "-"))


@pytest.mark.parametrize("word", parser_words())
def test_in_the_man_page(word):
    assert re.search(rf"(?<![\w-]){re.escape(word)}(?![\w-])", man_text()), word


def test_the_man_page_names_the_ssh_variable_and_troubleshooting():
    text = man_text()
    assert "ZDDCTL_SSH" in text
    assert "ss -tnp state established" in text
    for section in ("ROLLING DEPLOYS", "TROUBLESHOOTING", "ENVIRONMENT"):
        assert f".SH {section}" in text, section
