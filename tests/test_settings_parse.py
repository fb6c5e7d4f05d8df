"""One parser from raw values to MergeSettings (slerpviz.settings.merge_settings), shared by the page, the command
line and the benchmarks: the same values make the same settings, the same mistakes the same line, and per-cutoff
ratios have one syntax ("0.5, 1") everywhere."""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from slerpviz import cli, models, settings
from slerpviz.app import form
from slerpviz.bench import command, options, schedules
from slerpviz.settings import MergeSettings

EXPECTED = MergeSettings(cutoffs=(10, 20), ratio=(0.5, 1.0), keep_start=2, keep_end=3, method="lerp",
                         positions="first", choice="attention", attention_window=4, attention_keep=5,
                         attention_reach=2, attention_keep_share=0.25, keep_recent=7)


def page(cutoffs=(10, 20), ratio="0.5, 1") -> MergeSettings:
    """The page's parse, as a client sends the form (the first cutoff on the slider, the rest as text)."""
    return form.parse(form.Form(
        prompt="hi", model=None, chat=True, cutoff=cutoffs[0], more_cutoffs=", ".join(map(str, cutoffs[1:])),
        keep_start=2, keep_end=3, method="lerp", positions="first", mode="cached", max_new_tokens=4,
        temperature=0.0, seed=0, ratio=1.0, ratios=ratio, choice="attention", proportional=False,
        attention_window=4, attention_keep=5, attention_reach=2, attention_keep_share=0.25, keep_recent=7)).settings


def cli_args(cutoffs=(10, 20), ratios=("0.5, 1",)) -> list[str]:
    return ["generate", "--prompt", "hi", *(w for c in cutoffs for w in ("--cutoff", str(c))),
            *(w for r in ratios for w in ("--ratio", r)), "--keep-start", "2", "--keep-end", "3", "--method", "lerp",
            "--positions", "first", "--choice", "attention", "--attention-window", "4", "--attention-keep", "5",
            "--attention-reach", "2", "--attention-keep-share", "0.25", "--keep-recent", "7"]


def command_line(cutoffs=(10, 20), ratios=("0.5, 1",)) -> MergeSettings:
    """`python -m slerpviz generate`'s flags, checked before the model loads, then placed for a 30-layer model."""
    args = cli.build_parser().parse_args(cli_args(cutoffs, ratios))
    cli.check_arguments(args)
    return cli.merge_settings(args, 30)


def bench_args(cutoffs="10+20", ratio="0.5,1") -> list[str]:
    return ["retrieval", "--cutoffs", cutoffs, "--ratio", ratio, "--keep-start", "2", "--keep-end", "3", "--method",
            "lerp", "--positions", "first", "--choice", "attention", "--attention-window", "4", "--attention-keep",
            "5", "--attention-reach", "2", "--attention-keep-share", "0.25", "--keep-recent", "7"]


def bench(cutoffs="10+20", ratio="0.5,1") -> MergeSettings:
    """`python -m slerpviz.bench retrieval`'s options, read back as the retrieval plan reads them."""
    args = command.parser().parse_args(bench_args(cutoffs, ratio))
    (schedule,) = schedules.parse(args.cutoffs)
    return options.merge_settings(args, schedule)


def test_the_same_raw_values_make_the_same_settings_on_the_page_the_command_line_and_the_benchmarks():
    assert page() == command_line() == bench() == EXPECTED
    # The one syntax, with or without spaces, and the CLI's repeated --ratio flags as sugar for it.
    assert page(ratio="0.5,1") == command_line(ratios=("0.5,1",)) == command_line(ratios=("0.5", "1")) == EXPECTED
    assert bench(ratio="0.5, 1") == EXPECTED
    # One ratio for every cutoff.
    assert page(ratio="0.5") == command_line(ratios=("0.5",)) == bench(ratio="0.5") == \
        MergeSettings(**{**EXPECTED.__dict__, "ratio": 0.5})
    # And the library's parser itself, from the same raw values.
    assert settings.merge_settings(
        cutoffs=[10, 20], ratio="0.5, 1", keep_start="2", keep_end=3.0, method="lerp", positions="first",
        choice="attention", attention_window=4, attention_keep=5, attention_reach=2,
        attention_keep_share=0.25, keep_recent="7") == EXPECTED


def test_a_layer_given_twice_merges_twice_there_on_the_page_the_command_line_and_the_benchmarks():
    # Groups of up to four tokens at layer 10: the layer twice, each time with its own ratio, in the order given.
    expected = MergeSettings(**{**EXPECTED.__dict__, "cutoffs": (10, 10, 20), "ratio": (0.5, 1.0, 1.0)})
    assert page((10, 10, 20), "0.5, 1, 1") == command_line((10, 10, 20), ("0.5, 1, 1",)) == \
        bench("10+10+20", "0.5,1,1") == expected


BAD_RATIOS = [
    ("0.5, 2", "ratio per cutoff must be a number from 0 to 1 (got ' 2')"),
    ("0.5, x", "ratio per cutoff must be a number from 0 to 1 (got ' x')"),
    ("0.5, nan", "ratio per cutoff must be a number from 0 to 1 (got ' nan')"),
    # The benchmarks' old syntax: refused everywhere, with a line naming the one that is read.
    ("0.5/1", "ratio per cutoff: separate the ratios with commas, like 0.5,1 (got '0.5/1')"),
]


@pytest.fixture
def no_model(monkeypatch):
    monkeypatch.setattr(models, "load", lambda *args, **kwargs: pytest.fail("the model was loaded for bad input"))


@pytest.mark.parametrize("raw, message", BAD_RATIOS)
def test_a_bad_per_cutoff_ratio_list_is_one_line_with_the_same_words_on_the_page_the_cli_and_the_benchmarks(
        raw, message, no_model, capsys):
    with pytest.raises(ValueError) as refused:
        page(ratio=raw)
    assert str(refused.value) == message
    assert cli.main(cli_args(ratios=(raw,))) == 2
    assert capsys.readouterr().err == f"error: {message}\n"
    with pytest.raises(SystemExit) as exit_:
        command.main(bench_args(ratio=raw))
    assert exit_.value.code == 2
    assert capsys.readouterr().err == f"error: argument --ratio: {message} (see python -m slerpviz.bench retrieval " \
                                      "--help)\n"


def test_ratios_that_do_not_match_the_cutoffs_are_one_line_with_the_same_words_everywhere(no_model, tmp_path,
                                                                                          capsys):
    message = "ratio per cutoff: 2 ratios for 1 cutoffs (3): give one per cutoff, in the cutoffs' order, or one for all"
    with pytest.raises(ValueError) as refused:
        page(cutoffs=(3,))
    assert str(refused.value) == message
    assert cli.main(cli_args(cutoffs=(3,))) == 2
    assert capsys.readouterr().err == f"error: {message}\n"
    # The benchmarks know their schedules once the model is built (a tiny one here): refused before any prompt runs.
    assert command.main([*bench_args(cutoffs="3"), "--shape", "tiny", "--device", "cpu", "--lengths", "256",
                         "--out", str(tmp_path)]) == 2
    assert capsys.readouterr().err == f"error: {message}\n"
    # speed and fidelity count them against every schedule too.
    for name in ("speed", "fidelity"):
        assert command.main([name, "--shape", "tiny", "--device", "cpu", "--quick", "--cutoffs", "1+2,3",
                             "--ratio", "0.5,1", "--out", str(tmp_path)]) == 2
        assert capsys.readouterr().err == f"error: {message}\n"


def test_one_description_of_a_setting_for_the_command_line_and_the_benchmarks():
    assert options.settings_label is settings.describe
    assert settings.describe(EXPECTED) == ("cutoff 10+20, ratio 0.5/1, attention, W 4, keep top 5, keep share 0.25, "
                                           "reach 2, protect 2/3, recent 7, method lerp, positions first")


def test_the_benchmarks_import_nothing_from_the_command_line():
    bench = Path(options.__file__).parent
    for path in bench.glob("*.py"):
        for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
            if isinstance(node, ast.ImportFrom):
                assert node.module not in ("cli", "slerpviz.cli") and not (node.level == 2 and node.module is None
                                                                          and any(a.name == "cli" for a in node.names)), \
                    f"{path.name} imports the command line"
