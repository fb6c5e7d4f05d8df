"""The retrieval benchmark: prompts (exact length, the needle at the asked depth), scoring, files, bad input."""

import argparse
import csv
import dataclasses
import json

import pytest

from slerpviz.bench import command
from slerpviz.bench.retrieval import (RETRIEVAL_COLUMNS, RetrievalPlan, heatmaps, passkey_accuracy, run_retrieval,
                                      summarise)
from slerpviz.bench.options import settings_label
from slerpviz.bench.texts import read_texts
from slerpviz.engine import MergeSettings
from slerpviz.tasks import TASKS, Haystack, build_prompt, is_correct


@pytest.fixture(scope="module")
def haystack(embedded):
    return Haystack(embedded.tokenizer, [text for _, text in read_texts()])


@pytest.mark.parametrize("task", TASKS)
@pytest.mark.parametrize("length", [300, 1024, 2049])
def test_prompt_has_the_exact_length_and_the_answer_in_its_needle(haystack, embedded, task, length):
    prompt = build_prompt(haystack, task, length, 0.5, sample=1)
    assert prompt.ids.shape == (1, length)
    needle = embedded.tokenizer.decode(prompt.ids[0, prompt.needle_start:prompt.needle_end])
    assert prompt.answer in needle
    text = embedded.tokenizer.decode(prompt.ids[0])
    assert text.count(prompt.answer) == (2 if task == "passkey" else 1)  # the key is said twice; no leaks elsewhere
    assert text.rstrip().endswith("is")  # the question ends where the answer begins


@pytest.mark.parametrize("task", TASKS)
def test_needle_sits_at_the_asked_depth(haystack, task):
    length = 1024
    starts = {d: build_prompt(haystack, task, length, d, sample=0).needle_start for d in (0.0, 0.25, 0.5, 0.75, 1.0)}
    first, last = build_prompt(haystack, task, length, 0.0, 0), build_prompt(haystack, task, length, 1.0, 0)
    span = last.needle_start - first.needle_start  # the filler the needle can move through (distractors aside)
    assert span > 0.8 * length
    for depth, start in starts.items():
        # the nearest sentence boundary: within a long sentence (and the distractors, for multikey) of the target
        assert abs((start - first.needle_start) / span - depth) < 0.1, (depth, start)
    assert list(starts.values()) == sorted(starts.values())


def test_prompts_are_seeded_and_samples_differ(haystack):
    a, b = build_prompt(haystack, "passkey", 512, 0.5, 0), build_prompt(haystack, "passkey", 512, 0.5, 0)
    c = build_prompt(haystack, "passkey", 512, 0.5, 1)
    assert a.answer == b.answer and a.ids.equal(b.ids)
    assert c.answer != a.answer and not c.ids.equal(a.ids)
    assert build_prompt(haystack, "passkey", 512, 0.5, 0, seed=1).answer != a.answer


def test_multikey_asks_for_one_of_several_numbers(haystack, embedded):
    prompt = build_prompt(haystack, "multikey", 1024, 0.25, 3)
    text = embedded.tokenizer.decode(prompt.ids[0])
    assert text.count("The special magic number for") >= 3  # the asked one, its distractors, the question
    asked = text.rsplit("What is the special magic number for ", 1)[1].split("?")[0]
    assert f"magic number for {asked} is {prompt.answer}." in text


def test_scoring_wants_the_exact_number():
    assert is_correct("48213", " 48213. Remember")
    assert is_correct("48213", "The pass key is 48213")
    assert not is_correct("48213", " 4821")
    assert not is_correct("48213", " 148213")  # part of a longer number
    assert not is_correct("48213", " 48 213")


def test_too_short_filler_and_unknown_task_are_refused(embedded):
    short = Haystack(embedded.tokenizer, ["One sentence of filler. Another one."])
    with pytest.raises(ValueError, match="filler text has"):
        build_prompt(short, "passkey", 512, 0.5, 0)
    with pytest.raises(ValueError, match="unknown task"):
        build_prompt(short, "needle", 512, 0.5, 0)


def test_run_on_a_tiny_model_gives_a_row_per_trial_and_variant(haystack, monkeypatch):
    """A real run on a tiny model whose continuations are then scripted per variant (a random model never writes a
    digit): each trial's `correct` is known without the scorer under test."""
    from conftest import tiny_engine

    from slerpviz.bench import retrieval

    engine = tiny_engine("llama")
    hay = Haystack(engine.tokenizer, ["w3 w4 w5 . w6 w7 w8 w9 . " * 200])
    variants = (("cutoff 3", MergeSettings(cutoffs=(3,))), ("cutoff 2, ratio 0.5", MergeSettings((2,), ratio=0.5)))
    # what each variant "says": the answer alone, the answer inside a longer number, the answer's digits apart
    script = {MergeSettings(): lambda answer: f" {answer}. Remember", variants[0][1]: lambda answer: f" 1{answer}",
              variants[1][1]: lambda answer: f" {answer[:2]} {answer[2:]}"}
    expected = {"base": 1, "cutoff 3": 0, "cutoff 2, ratio 0.5": 0}
    built = []
    real_build, real_greedy = retrieval.build_prompt, retrieval.greedy

    def build_prompt(*args, **kwargs):
        built.append(real_build(*args, **kwargs))
        return built[-1]

    def greedy(engine, ids, settings, new_tokens):
        assert ids.equal(built[-1].ids)  # every variant continues the prompt built last
        trace = real_greedy(engine, ids, settings, new_tokens)
        trace.text = script[settings](built[-1].answer)
        return trace

    monkeypatch.setattr(retrieval, "build_prompt", build_prompt)
    monkeypatch.setattr(retrieval, "greedy", greedy)
    plan = RetrievalPlan(tasks=TASKS, lengths=(80, 160), depths=(0.0, 1.0), samples=2, variants=variants)
    rows = run_retrieval(engine, hay, plan, log=lambda m: None)
    assert len(rows) == 2 * 2 * 2 * 2 * 3
    assert {r["variant"] for r in rows} == {"base", "cutoff 3", "cutoff 2, ratio 0.5"}
    for row in rows:
        assert set(RETRIEVAL_COLUMNS) <= set(row)
        assert row["correct"] == expected[row["variant"]], row
        assert (row["flop_limit"] == 1.0) == (row["variant"] == "base")
    assert all(r["flop_limit"] > 1 for r in rows if r["variant"] == "cutoff 3")
    cells = summarise(rows)
    assert all(c["n"] == 2 for c in cells) and len(cells) == 2 * 3 * 2 * 2
    assert {(c["variant"], c["correct"], c["accuracy"]) for c in cells} == {
        ("base", 2, 1.0), ("cutoff 3", 0, 0.0), ("cutoff 2, ratio 0.5", 0, 0.0)}
    assert passkey_accuracy(rows, "base", 100) == (4, 4)  # 160 tokens: 2 depths x 2 samples, every one found
    assert passkey_accuracy(rows, "cutoff 3") == (0, 8)


def test_variant_labels_say_what_differs():
    assert settings_label(MergeSettings(cutoffs=(15,))) == "cutoff 15"
    attention = MergeSettings(cutoffs=(15, 20), ratio=(0.5, 1.0), choice="attention", cosine_share=0.25,
                              proportional=True, positions="first", keep_end=16)
    assert settings_label(attention) == ("cutoff 15+20, ratio 0.5/1, attention, W 8, keep top 32, cosine share 0.25, "
                                         "protect 0/16, proportional, positions first")
    assert settings_label(MergeSettings(cutoffs=(7, 15), ratio=0.5, choice="similar")) == \
        "cutoff 7+15, ratio 0.5, similar"


def test_command_writes_files_with_the_columns(tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["retrieval", "--shape", "tiny", "--quick", "--lengths", "600,700", "--depths", "0,1", "--samples", "1",
            "--out", str(out)]
    assert command.main(argv) == 0
    with open(out / "retrieval.csv") as f:
        rows = list(csv.DictReader(f))
    assert tuple(rows[0]) == RETRIEVAL_COLUMNS
    assert len(rows) == 2 * 2 * 2 * 2  # tasks x lengths x depths x (base + cutoff N/2)
    assert {r["variant"] for r in rows} == {"base", "cutoff 2"}
    summary = list(csv.DictReader(open(out / "retrieval_summary.csv")))
    assert {"task", "variant", "length", "depth", "n", "accuracy"} <= set(summary[0])
    payload = json.loads((out / "retrieval.json").read_text())
    assert payload["machine"]["command"].startswith("python -m slerpviz.bench retrieval")
    assert "git_commit" in payload["machine"]
    assert "plotly" in (out / "retrieval.html").read_text()
    figure = heatmaps(payload["cells"], "passkey")  # base and the variant side by side
    assert [trace.type for trace in figure.data] == ["heatmap", "heatmap"]
    assert [a.text for a in figure.layout.annotations] == ["base", "cutoff 2"]
    assert figure.data[0].text[0][0] in {"0/1", "1/1"}
    printed = capsys.readouterr().out
    assert "correct/n" in printed and "cutoff 2" in printed


@pytest.mark.parametrize("argv, message", [
    (["--lengths", "5000"], "does not fit the model's context"),
    (["--tasks", "needle"], "unknown task"),
    (["--depths", "0,1.5"], "between 0 and 1"),
    (["--cutoffs", "9"], "out of range"),
    (["--lengths", "abc"], "bad list of whole numbers"),
])
def test_bad_input_exits_2_with_one_line(tmp_path, capsys, argv, message):
    assert command.main(["retrieval", "--shape", "tiny", "--out", str(tmp_path), *argv]) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0] and "Traceback" not in err


def test_filler_too_short_exits_2(tmp_path, capsys):
    text = tmp_path / "short.txt"
    text.write_text("Only a few words here.")
    assert command.main(["retrieval", "--shape", "tiny", "--texts", str(text), "--lengths", "900",
                         "--out", str(tmp_path)]) == 2
    assert "filler text has" in capsys.readouterr().err


def test_find_passkey_locates_the_needle_tokens(haystack, embedded):
    from slerpviz.tasks import find_passkey

    prompt = build_prompt(haystack, "passkey", 700, 0.5, 2)
    tokens = embedded.token_strings(prompt.ids)
    needle = find_passkey(tokens)
    assert needle.answer == prompt.answer
    assert needle.start <= prompt.needle_start + 2 and needle.end >= prompt.needle_end - 1
    assert prompt.answer in "".join(tokens[needle.start:needle.end])
    assert find_passkey(embedded.token_strings(build_prompt(haystack, "multikey", 700, 0.5, 2).ids)) is None
    assert find_passkey(["What", " is", " the", " pass", " key", "?"]) is None
    assert find_passkey(["the", " pass", " key", " is", " 123", "45", "."]).answer == "12345"


def test_snapshot_renders_a_report_to_png(tmp_path):
    from pathlib import Path

    if not Path("/usr/bin/chromium").exists():
        pytest.skip("Debian chromium is not installed")
    from slerpviz.bench.report import write_html

    cells = [{"task": "passkey", "variant": v, "length": 512, "depth": 0.5, "n": 2, "correct": c,
              "accuracy": c / 2} for v, c in (("base", 2), ("cutoff 15", 0))]
    write_html(tmp_path / "r.html", "test", {}, [heatmaps(cells, "passkey")], [])
    assert command.main(["snapshot", str(tmp_path / "r.html"), str(tmp_path / "r.png")]) == 0
    assert (tmp_path / "r.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_needle_merged_is_the_share_of_the_needle_in_merged_slots():
    from slerpviz.bench.retrieval import merged_share
    from slerpviz.engine import Trace

    trace = Trace(tokens=["t"] * 8, slot_tokens=[[[0], [1, 2], [3], [4, 5], [6], [7]]], protected=[], cutoffs=[1],
                  seq_len_per_layer=[], num_layers=2, mode="cached", settings={})
    assert merged_share(trace, 2, 6) == 0.75  # tokens 2, 4, 5 of 2..5
    assert merged_share(trace, 6, 8) == 0.0
    trace.slot_tokens = []
    assert merged_share(trace, 2, 6) == 0.0  # base: nothing merges


def test_per_cutoff_ratios_on_the_command_line():
    # Comma-separated, as on the page and the CLI (slerpviz.settings.merge_ratio); the old "0.5/1" is refused.
    from slerpviz.bench import retrieval
    from slerpviz.bench.options import merge_settings, ratios

    assert ratios("0.5") == 0.5 and ratios("0.5,1") == (0.5, 1.0) and ratios("0.5, 1") == (0.5, 1.0)
    with pytest.raises(argparse.ArgumentTypeError, match="separate the ratios with commas, like 0.5,1"):
        ratios("0.5/1")
    args = retrieval.parser().parse_args(["--cutoffs", "2+3", "--ratio", "0.5,1", "--choice", "attention"])
    assert args.ratio == (0.5, 1.0)
    assert merge_settings(args, (2, 3)) == MergeSettings(cutoffs=(2, 3), ratio=(0.5, 1.0), choice="attention")


def test_a_preset_variant_takes_the_method_and_positions_asked_for():
    # `--preset recommended --method drop` once ran the preset's own SLERP, silently: the flags now apply, as in speed.
    from conftest import tiny_engine
    from slerpviz import presets
    from slerpviz.bench import retrieval

    tiny = tiny_engine("llama")
    args = retrieval.parser().parse_args(["--preset", "recommended", "--method", "drop", "--positions", "first"])
    (label, settings), = retrieval.retrieval_plan(args, tiny).variants
    assert settings == dataclasses.replace(presets.recommended(tiny.num_layers), method="drop", positions="first")
    assert "method drop" in label and "positions first" in label
