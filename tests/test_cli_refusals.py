"""The command line refuses bad input in one line, with status 2, before it spends seconds loading the model."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from slerpviz import cli, models
from slerpviz.presets import PRESETS


@pytest.fixture
def no_model(monkeypatch):
    """Any load fails the test: these inputs must be refused before the model is loaded."""
    monkeypatch.setattr(models, "load", lambda *args, **kwargs: pytest.fail("the model was loaded for bad input"))


@pytest.mark.parametrize("args, message", [
    (["--temperature", "inf"], "temperature must be a finite number"),
    (["--temperature", "nan"], "temperature must be a finite number"),
    (["--seed", "-5"], "seed must be a whole number from 0 to 2**63 - 1"),
    (["--seed", str(2**64)], "seed must be a whole number from 0 to 2**63 - 1"),
    (["--top-p", "0"], "top-p must be in (0, 1]"),
    (["--max-new-tokens", "0"], "max new tokens must be a whole number of at least 1"),
    (["--method", "avg"], "unknown merge method 'avg'"),
    (["--positions", "middle"], "unknown positions mode 'middle'"),
    (["--choice", "random"], "unknown pair choice 'random'"),
    (["--mode", "fast"], "unknown mode 'fast'"),
    (["--keep-start", "-1"], "keep start must be a whole number, 0 or more"),
    (["--keep-recent", "-1"], "keep recent must be a whole number, 0 or more"),
    (["--cutoff", "-3"], "cutoff must be a whole number, 0 or more"),
    (["--ratio", "1.5"], "merge ratio must be a number from 0 to 1 (got '1.5')"),
    (["--cutoff", "5", "--ratio", "0.5", "--ratio", "1"], "ratio per cutoff: 2 ratios for 1 cutoffs (5): give one"),
    (["--cutoff", "5", "--ratio", "0.5,1"], "ratio per cutoff: 2 ratios for 1 cutoffs (5): give one"),
    (["--preset", "recommended", "--ratio", "0.5,0.5,1"], "ratio per cutoff: 3 ratios for 2 cutoffs: give one"),
    (["--ratio", "0.5/1"], "ratio per cutoff: separate the ratios with commas, like 0.5,1 (got '0.5/1')"),
    (["--model", "gpt2"], "not on the allow-list"),
    (["--prompt", "  "], "the prompt is empty"),
    (["--attention-window", "0"], "attention window must be a whole number, 1 or more (got 0)"),
    (["--attention-keep", "-1"], "attention keep must be a whole number, 0 or more (got -1)"),
    (["--attention-reach", "300"], "attention reach must be a whole number from 0 to 256 (got 300)"),
    (["--attention-keep-share", "1.5"], "attention keep share must be a number from 0 to 1 (got 1.5)"),
    (["--preset", "fastest"], "unknown preset 'fastest'; choose one of " + ", ".join(PRESETS)),
])
def test_bad_input_is_refused_before_loading(no_model, capsys, args, message):
    argv = ["generate", *(args if "--prompt" in args else ["--prompt", "hi", *args])]
    assert cli.main(argv) == 2
    err = capsys.readouterr().err
    assert err.startswith("error: ") and message in err and err.count("\n") == 1


@pytest.mark.parametrize("args, message", [
    (["--attention-window", "2.5"], "argument --attention-window: invalid int value: '2.5'"),
    (["--cutoff", "abc"], "argument --cutoff: invalid int value: 'abc'"),
    (["--no-such-flag"], "unrecognized arguments: --no-such-flag"),
])
def test_a_value_argparse_refuses_is_one_line_too(no_model, capsys, args, message):
    with pytest.raises(SystemExit) as exit_:
        cli.main(["generate", "--prompt", "hi", *args])
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and err.startswith("error: ") and message in err and err.count("\n") == 1


def test_a_model_that_cannot_load_is_one_line(monkeypatch, capsys):
    def unreachable(name, **options):
        raise OSError(f"We couldn't connect to 'https://huggingface.co' to load the files of {name}. Check your "
                      "internet connection or see\nhttps://huggingface.co/docs/transformers/installation#offline-mode")

    monkeypatch.setattr(models, "load", unreachable)
    assert cli.main(["generate", "--prompt", "hi", "--model", "Qwen/Qwen2.5-0.5B-Instruct"]) == 2
    err = capsys.readouterr().err
    assert err == ("error: could not load Qwen/Qwen2.5-0.5B-Instruct: We couldn't connect to 'https://huggingface.co' "
                   "to load the files of Qwen/Qwen2.5-0.5B-Instruct.\n")


def test_an_unreachable_hub_model_exits_2_with_one_line(tmp_path):
    """The real thing, offline with an empty cache: the hub cannot be reached; one line, not a traceback."""
    environment = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_HOME": str(tmp_path)}
    result = subprocess.run([sys.executable, "-m", "slerpviz", "generate", "--prompt", "hi", "--model",
                             "Qwen/Qwen2.5-1.5B-Instruct"], capture_output=True, text=True, timeout=300,
                            env=environment)
    assert result.returncode == 2, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error: could not load Qwen/Qwen2.5-1.5B-Instruct: ")


def test_one_line_keeps_a_first_sentence_or_cuts_a_long_one_at_a_word():
    from slerpviz.settings import one_line

    assert one_line(OSError("Could not connect.\nSee the docs. More.")) == "Could not connect."
    long = "An error happened while trying to locate the files on the Hub " * 5
    cut = one_line(OSError(long))
    assert cut.endswith(" …") and len(cut) <= 202 and long.startswith(cut[:-2]) and long[len(cut) - 2] == " "
