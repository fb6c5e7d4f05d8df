"""The README's code runs as printed, and its figures for the presets are those of docs/measurements.md's "In short"
and of the result files behind them.

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


# ----------------------------------------------------------------------------------------------------------------
# docs/measurements.md's "In short" and the README's table say the same of the presets, as their result files do
# ----------------------------------------------------------------------------------------------------------------


def readme_table_row(name: str) -> dict:
    """The README's "presets as they are now" table row of `name`: FLOP limits, measured time to first token, top-1
    short / long, retrieval answers of 120."""
    block = next(b["code"] for b in code_blocks(README) if "retrieval answers" in b["code"])
    line = next(line for line in block.splitlines() if line.split()[:1] == [name])
    number = r"(\d+\.\d+)"
    match = re.match(rf"{name}\s+{number} / {number} / {number}\s+{number}x\s+{number} / {number}\s+(\d+)\s", line)
    assert match, f"the README's {name} row reads otherwise: {line}"
    low, _, high, ttft, top1, top1_long, answers = match.groups()
    return {"flops": (low, high), "ttft": ttft, "top1": top1, "top1_long": top1_long, "answers": int(answers)}


def in_short() -> str:
    text = (ROOT / "docs" / "measurements.md").read_text(encoding="utf-8")
    start = text.index("**In short**")
    return " ".join(text[start:text.index("\n\n", start)].split())


@pytest.mark.parametrize("name", ["recommended", "fast"])
def test_in_short_gives_the_preset_as_the_readme_does(name):
    row, summary = readme_table_row(name), in_short()
    sentence = summary[summary.index(f"`{name}` does"):]
    sentence = sentence[:sentence.index(";", sentence.index(" of 120"))]  # this preset's clause
    assert f"{row['flops'][0]}× to {row['flops'][1]}× fewer" in sentence, sentence
    assert row["top1"] in sentence and f"{row['answers']} of 120" in sentence, sentence
    assert f"{row['ttft']}× for `{name}`" in summary


@pytest.mark.parametrize("name", ["recommended", "fast"])
def test_the_readme_gives_the_presets_answers_as_their_held_out_run_found_them(name):
    """The run of the preset as it is now on the held-out texts, 512 to 2,048 tokens, both tasks (n = 120)."""
    import csv
    import json

    from slerpviz.bench.options import settings_label
    from slerpviz.presets import preset

    label = settings_label(preset(name, 30))  # the embedded model's 30 layers
    runs = []
    for path in sorted((ROOT / "assets" / "results").glob("*/retrieval.json")):
        run = json.loads(path.read_text())
        plan = run["plan"]
        if ("--texts assets/heldout" in run["machine"]["command"] and plan["lengths"] == [512, 1024, 2048]
                and plan["seed"] == 0 and label in [v["label"] for v in plan["variants"]]):
            runs.append(path.parent)
    assert len(runs) == 1, f"{name} as it is now has {len(runs)} held-out runs at 512 to 2,048 tokens: {runs}"
    with open(runs[0] / "retrieval.csv", newline="") as f:
        trials = [r for r in csv.DictReader(f) if r["variant"] in (label, "base")]
    merged = [int(r["correct"]) for r in trials if r["variant"] == label]
    assert len(merged) == 120 and sum(merged) == readme_table_row(name)["answers"]
    base = sum(int(r["correct"]) for r in trials if r["variant"] == "base")
    base_row = next(line for b in code_blocks(README) if "retrieval answers" in b["code"]
                    for line in b["code"].splitlines() if line.startswith("base "))
    assert base_row.split()[-2] == str(base)  # retrieval answers, then the pass key at 1,024 tokens
