"""Every command answers a command line it cannot use alike: one line ``PROG: error: ...`` on stderr (never
argparse's usage block, never a traceback) and exit status 2, before it loads anything. Every number flag of
every command refuses NaN and infinity."""

from __future__ import annotations

import argparse

import pytest

from ldm_export import cli as export_cli
from ldm_export import sd_import
from ldm_runtime import sample
from ldm_runtime.command_line import finite_float
from ldm_serve import cli as serve_cli
from ldm_tools import evaluate, sheet
from ldm_tools.bench import cli as bench_cli
from ldm_train import cli as train_cli

# (program, its main, its parser, arguments that make an otherwise complete command line)
COMMANDS = [
    ("ldm-train", train_cli.main, train_cli.build_parser, ["autoencoder", "--out", "OUT"]),
    ("ldm-export", export_cli.main, export_cli.build_parser, ["CHECKPOINT", "--out", "OUT"]),
    ("ldm-import", sd_import.main, sd_import.build_parser, ["SOURCE", "--out", "OUT"]),
    ("ldm-sample", sample.main, sample.build_parser, ["--model", "MODEL", "--out", "OUT", "a prompt"]),
    ("ldm-eval", evaluate.main, evaluate.build_parser, ["--model", "MODEL", "--json", "OUT.json"]),
    ("ldm-serve", serve_cli.main, serve_cli.build_parser, ["--model", "MODEL"]),
    ("ldm-bench", bench_cli.main, bench_cli.build_parser, ["--model", "MODEL"]),
    ("ldm-sheet", sheet.main, sheet.build_parser, ["TITLE=FOLDER", "--out", "OUT.png"]),
]
IDS = [command[0] for command in COMMANDS]


def assert_one_line(prog: str, code: int, err: str, fragment: str) -> None:
    assert code == 2, err
    assert err.startswith(f"{prog}: error: ") and err.count("\n") == 1, err
    assert fragment in err and "usage:" not in err and "Traceback" not in err, err


@pytest.mark.parametrize("prog, main, build_parser, complete", COMMANDS, ids=IDS)
@pytest.mark.parametrize("bad, fragment", [
    (["--no-such-flag"], "unrecognized arguments: --no-such-flag"),
    (["--no-such-flag", "3"], "unrecognized arguments: --no-such-flag 3"),
])
def test_an_unknown_flag_is_one_line_and_exit_2_in_every_command(prog, main, build_parser, complete, bad, fragment,
                                                                 capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)  # nothing may be written, and any relative path lands here
    code = main([*complete, *bad])
    assert_one_line(prog, code, capsys.readouterr().err, fragment)
    assert list(tmp_path.iterdir()) == []


def number_flags(parser: argparse.ArgumentParser) -> list[tuple[list[str], str]]:
    """(the subcommand, if any; the flag) for every option of ``parser`` (and its subcommands) that takes a float."""
    flags = []
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for name, sub in action.choices.items():
                flags += [([name, *prefix], flag) for prefix, flag in number_flags(sub)]
        elif action.type in (float, finite_float):
            flags.append(([], action.option_strings[-1]))
    return flags


FLOAT_FLAGS = [(prog, main, build_parser, complete, subcommand, flag)
               for prog, main, build_parser, complete in COMMANDS
               for subcommand, flag in number_flags(build_parser())]


def test_the_commands_have_number_flags_to_check():
    progs = {prog for prog, *_ in FLOAT_FLAGS}
    assert {"ldm-train", "ldm-sample", "ldm-eval", "ldm-serve"} <= progs and len(FLOAT_FLAGS) >= 15


@pytest.mark.parametrize("prog, main, build_parser, complete, subcommand, flag", FLOAT_FLAGS,
                         ids=[f"{item[0]} {' '.join(item[4])} {item[5]}".replace("  ", " ") for item in FLOAT_FLAGS])
@pytest.mark.parametrize("value", ["nan", "inf", "-inf", "1e999"])
def test_every_number_flag_refuses_nan_and_infinity(prog, main, build_parser, complete, subcommand, flag, value,
                                                    capsys, tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    if subcommand:  # ldm-train STAGE ...
        complete = [*subcommand, *complete[1:]]
    code = main([*complete, f"{flag}={value}"])
    assert_one_line(prog, code, capsys.readouterr().err, f"argument {flag}: '{value}' is not a finite number")
    assert list(tmp_path.iterdir()) == []
