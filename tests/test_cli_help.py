"""The command explains itself: every flag has help, every subcommand a description and examples."""

from __future__ import annotations

import argparse
import subprocess
import sys
from pathlib import Path

import pytest

from hetserve import __version__
from hetserve.cli import build_parser

REPO = Path(__file__).resolve().parent.parent


def _parsers(parser: argparse.ArgumentParser, path: tuple[str, ...] = ("hetserve",)):
    yield path, parser
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                yield from _parsers(sub, (*path, name))


PARSERS = list(_parsers(build_parser()))


def test_every_subcommand_is_walked():
    names = {" ".join(path) for path, _ in PARSERS}
    assert {"hetserve archive", "hetserve partition", "hetserve bench", "hetserve tune"} <= names


@pytest.mark.parametrize(("path", "parser"), PARSERS, ids=[" ".join(p) for p, _ in PARSERS])
def test_every_flag_has_help_and_no_rst_markup(path, parser):
    missing = [a.option_strings or a.dest for a in parser._actions if not (a.help or "").strip()]
    assert not missing, f"{' '.join(path)}: flags without help: {missing}"
    text = parser.format_help()
    assert "``" not in text and ":class:" not in text


@pytest.mark.parametrize(("path", "parser"), PARSERS[1:], ids=[" ".join(p) for p, _ in PARSERS[1:]])
def test_every_subcommand_has_a_description_and_an_example_that_parses(path, parser):
    assert parser.description and len(parser.description.split()) > 8
    assert parser.epilog and parser.epilog.startswith("examples:")
    examples = [line for line in parser.epilog.replace("\\\n", " ").splitlines() if line.strip().startswith("hetserve ")]
    assert examples, parser.epilog
    for example in examples:
        argv = example.split()[1:]
        build_parser().parse_args(argv)  # a stale example (renamed flag) exits 2 here


def test_defaults_are_shown():
    archive = dict(PARSERS)[("hetserve", "archive")].format_help()
    assert "(default: 0.03)" in archive and "(default: model_store)" in archive
    assert "(default: None)" not in archive and "(default: False)" not in archive


def test_version_flag():
    done = subprocess.run([sys.executable, "-m", "hetserve", "--version"], cwd=REPO,
                          capture_output=True, text=True, timeout=60)
    assert done.returncode == 0
    assert done.stdout.strip() == f"hetserve {__version__}"


def test_the_load_generator_module_explains_its_flags_too():
    from hetserve.loadgen import build_parser as loadgen_parser

    parser = loadgen_parser()
    missing = [a.option_strings for a in parser._actions if not (a.help or "").strip()]
    assert not missing
    assert "``" not in parser.format_help()


def test_tune_offers_the_goodput_objective_and_the_local_search():
    from hetserve.cli import tune_options

    args = build_parser().parse_args(["tune", "--mar", "m.mar", "--out", "o", "--objective", "goodput",
                                      "--search", "local", "--concurrency", "4", "--trials", "4"])
    options = tune_options(args)
    assert (options.objective, options.search, options.concurrency, options.trials) == ("goodput", "local", 4, 4)
    default = tune_options(build_parser().parse_args(["tune", "--mar", "m.mar", "--out", "o"]))
    assert (default.objective, default.search) == ("max-rate", "tpe")  # unchanged for existing users
    with pytest.raises(SystemExit):
        build_parser().parse_args(["tune", "--mar", "m.mar", "--out", "o", "--search", "grid"])
