"""The README's code runs as printed.

The rule, as the README states it under "The library":
- every ```python block of README.md runs, exactly as printed, each in a fresh namespace, on the embedded model
  (`slerpviz.models.load()` hands the blocks this session's embedded engine instead of loading a second copy);
- a ```python block that cannot run here (it needs a package slerpviz does not require, or a hub model) has the line
  `<!-- not run: REASON -->` right above its fence, REASON saying why; nothing else skips a block;
- ```bash blocks are shell commands (setup, the app, benchmarks of minutes to hours) and are not run; the
  `python -m slerpviz ...` and `python -m slerpviz.bench ...` lines in them (and in docs/measurements.md's) name only
  options their parsers take.
"""

from __future__ import annotations

import argparse
import re
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
README = ROOT / "README.md"
FENCE = re.compile(r"^```(\w*)\s*$")
SKIP = re.compile(r"^<!-- not run: (\S.*\S) -->$")


def code_blocks(path: Path) -> list[dict]:
    """Every fenced block: its language, first line number, code, and the reason given above it for not running."""
    lines = path.read_text(encoding="utf-8").splitlines()
    blocks, open_at = [], None
    for number, line in enumerate(lines, start=1):
        fence = FENCE.match(line)
        if fence is None:
            continue
        if open_at is None:
            open_at, language = number, fence.group(1)
        else:
            above = lines[open_at - 2] if open_at >= 2 else ""
            skip = SKIP.match(above)
            blocks.append({"language": language, "line": open_at, "code": "\n".join(lines[open_at:number - 1]),
                           "not_run": skip.group(1) if skip else None, "marked": above.startswith("<!-- not run")})
            open_at = None
    assert open_at is None, f"{path.name}: the block opened at line {open_at} is never closed"
    return blocks


PYTHON = [b for b in code_blocks(README) if b["language"] == "python"]


def test_the_readme_has_library_examples_to_run_and_says_why_it_skips_one():
    assert len([b for b in PYTHON if b["not_run"] is None]) >= 2  # the library and the patch
    for block in code_blocks(README):
        assert block["marked"] == (block["not_run"] is not None), f"line {block['line']}: a not-run mark without reason"
        assert block["not_run"] is None or block["language"] == "python", f"line {block['line']}: only python is run"


@pytest.mark.parametrize("block", [b for b in PYTHON if b["not_run"] is None], ids=lambda b: f"line{b['line']}")
def test_a_python_block_runs_as_printed(block, embedded, monkeypatch, capsys):
    from slerpviz import models

    monkeypatch.setattr(models, "load", lambda name=models.EMBEDDED, **options: embedded if name == models.EMBEDDED
                        else pytest.fail(f"README line {block['line']} loads {name}, which is not here"))
    forward = embedded.model.model.forward
    exec(compile(block["code"], f"README.md, the block at line {block['line']}", "exec"), {"__name__": "readme"})
    assert embedded.model.model.forward == forward  # a block leaves the model as it found it
    capsys.readouterr()


# ----------------------------------------------------------------------------------------------------------------
# The shell blocks: the commands name only options that exist
# ----------------------------------------------------------------------------------------------------------------


def parsers() -> dict[str, argparse.ArgumentParser]:
    from slerpviz import cli
    from slerpviz.bench import command

    def subcommands(parser):
        action = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        return action.choices

    found = {f"slerpviz {name}": p for name, p in subcommands(cli.build_parser()).items()}
    found.update({f"slerpviz.bench {name}": p for name, p in subcommands(command.parser()).items()})
    return found


def commands(path: Path) -> list[tuple[str, set[str], int]]:
    """(the subcommand, the options its lines name, the block's line) for each `python -m slerpviz[.bench] NAME`
    in the shell blocks of `path`; a line that starts with spaces continues the command above it."""
    found = []
    for block in code_blocks(path):
        if block["language"] != "bash":
            continue
        for line in block["code"].splitlines():
            code = line.split("#", 1)[0]
            start = re.search(r"-m (slerpviz(?:\.bench)?) ([a-z]+)", code)
            if start:
                found.append((f"{start.group(1)} {start.group(2)}", set(), block["line"]))
            elif not line.startswith(" ") or not found:
                continue
            found[-1][1].update(re.findall(r"(?<![\w-])--[a-z][a-z-]*", code))
    return found


@pytest.mark.parametrize("path", [README, ROOT / "docs" / "measurements.md"], ids=lambda p: p.name)
def test_the_shell_blocks_name_only_options_their_commands_take(path):
    known = parsers()
    found = commands(path)
    assert found, f"{path.name} shows no command"
    for name, flags, line in found:
        assert name in known, f"{path.name} line {line}: no command {name}"
        taken = {s for a in known[name]._actions for s in a.option_strings}
        assert flags <= taken, f"{path.name} line {line}: {name} takes no {sorted(flags - taken)}"
