"""The frontier benchmark: its front, its files and columns, on a tiny random-weight model. No timing asserted."""

import csv
import dataclasses
import json
import re
from pathlib import Path

import pytest

from slerpviz.bench import limits
from slerpviz.bench.engines import shape_config
from slerpviz.bench.frontier import FRONTIER_COLUMNS, best_at, is_article_setting, pareto_front
from slerpviz.bench.frontier import main as frontier_main
from slerpviz.bench.grids import ATTENTION_PASSES, beside_drop, default_grid, named_grid
from slerpviz.engine import MergeSettings
from slerpviz.pairs import merged_length, plan_stages

RESULTS = Path(__file__).resolve().parents[2] / "assets" / "results"


def test_pareto_front_keeps_the_rows_nothing_beats_on_both_axes():
    rows = [dict(prefill_speedup=s, top1=t) for s, t in [(1.0, 1.0), (1.2, 0.9), (1.1, 0.8), (1.5, 0.5), (1.5, 0.4)]]
    assert pareto_front(rows) == [True, True, False, True, False]


def test_best_at_picks_the_most_faithful_setting_fast_enough():
    rows = [dict(prefill_speedup=1.35, top1=0.8, kl_mean=0.1), dict(prefill_speedup=1.6, top1=0.85, kl_mean=0.3),
            dict(prefill_speedup=1.2, top1=0.99, kl_mean=0.0)]
    assert best_at(rows, 1.3) is rows[1]
    assert best_at(rows, 1.7) is None


def test_default_grid_spans_choices_and_holds_the_article_setting():
    grid = default_grid(30, quick=False)
    assert {s.choice for s in grid} == {"consecutive", "uniform", "similar"}
    assert any(s.proportional for s in grid) and len({s.ratio for s in grid}) == 4
    article = [s for s in grid if is_article_setting(s)]
    assert len(article) == len({s.cutoffs for s in grid}) and all(0 < s.cutoffs[0] < 30 for s in grid)
    assert not is_article_setting(MergeSettings(cutoffs=(5,), ratio=0.5))


def test_frontier_command_writes_its_files(tmp_path, capsys):
    out = tmp_path / "frontier"
    argv = ["--shape", "tiny", "--quick", "--out", str(out), "--prefixes", "48", "--speed-length", "96", "--repeats",
            "1", "--continuation", "3", "--retrieval-lengths", "300"]
    assert frontier_main(argv) == 0
    printed = capsys.readouterr().out
    assert "Pareto front" in printed and "best at 1.3x" in printed and "best at 1.3x (by FLOP limit)" in printed
    assert "best at 2x (by FLOP limit)" in printed
    assert "base: pass key" in printed
    with open(out / "frontier.csv", newline="") as f:
        reader = csv.DictReader(f)
        assert tuple(reader.fieldnames) == FRONTIER_COLUMNS
        rows = list(reader)
    # --quick's default grid on the tiny model's 4 layers: cutoffs at a quarter and half the depth (1, 2), ratios 0.5
    # and 1, consecutive pairs and similar ones with proportional attention; the article's is all pairs, consecutive.
    settings = [(int(r["cutoffs"]), float(r["ratio"]), r["choice"], r["proportional"] == "True") for r in rows]
    assert sorted(settings) == sorted((c, ratio, choice, proportional) for c in (1, 2) for ratio in (0.5, 1.0)
                                      for choice, proportional in (("consecutive", False), ("similar", True)))
    assert {(int(r["cutoffs"]), float(r["ratio"])) for r in rows if r["article"] == "True"} == {(1, 1.0), (2, 1.0)}
    assert all(r["choice"] == "consecutive" for r in rows if r["article"] == "True")
    assert any(r["on_front"] == "True" for r in rows)
    with open(out / "frontier_windows.csv", newline="") as f:
        windows = list(csv.DictReader(f))  # every setting on every sample: 2 random texts at one prefix
    assert len(windows) == 2 * len(rows) and len({w["setting"] for w in windows}) == len(rows)
    for index, row in enumerate(rows):  # in the rows' order, each setting's samples together
        mine = windows[2 * index: 2 * index + 2]
        assert len({w["setting"] for w in mine}) == 1 and {w["text"] for w in mine} == {"random-1", "random-2"}
        assert float(row["top1"]) == pytest.approx(sum(float(w["top1"]) for w in mine) / 2)
        assert all(w["prefix"] == "48" and float(w["base_margin"]) >= 0 for w in mine)
    for row in rows:
        assert 0 <= float(row["top1"]) <= 1 and float(row["prefill_speedup"]) > 0
        assert float(row["prefill_speedup_limit"]) >= 1
        assert int(row["passkey_n"]) == 3 and 0 <= int(row["passkey_correct"]) <= 3  # three depths, one sample
    shape = limits.Shape.from_config(shape_config("tiny"))
    for row in rows:
        if row["article"] == "True":  # all pairs at one cutoff: the limit is the plain merge's
            cutoff = int(row["cutoffs"])
            merged = [96] * cutoff + [merged_length(96)] * (4 - cutoff)
            expected = limits.prefill_speedup_limit(shape, [96] * 4, merged)
            assert float(row["prefill_speedup_limit"]) == pytest.approx(expected, rel=1e-5)  # CSV keeps 6 digits
    data = json.loads((out / "frontier.json").read_text())
    assert {"machine", "model", "rows", "best_at_1.3x", "best_at_1.5x", "best_at_2x", "best_at_1.3x_by_limit",
            "best_at_2x_by_limit"} <= data.keys()
    assert data["base_passkey"]["passkey_n"] == 3
    assert_report(out / "frontier.html", rows, "python -m slerpviz.bench frontier " + " ".join(argv))


def assert_report(path, rows: list[dict], command: str) -> None:
    """What the HTML report must hold: a whole page that opens offline (plotly.js inlined, nothing fetched), its
    title and command, the notes, and one figure of two panels (top-1, pass key) with a point in each for every
    setting of the CSV, named as it is."""
    page = path.read_text(encoding="utf-8")
    assert page.startswith("<!DOCTYPE html><html>") and page.rstrip().endswith("</html>")
    assert "<title>slerpviz frontier: tiny (random weights)</title>" in page and command in page
    assert re.search(r"plotly\.js v\d", page) and not re.search(r"<script[^>]*\ssrc=", page)  # inlined, offline
    assert page.count("Plotly.newPlot(") == 1 and "Pass key: a 5-digit key hidden at five depths" in page
    # the panels' titles; JSON writes "/" as \u002f and "<" as \u003c
    assert "next-token top-1 agreement with base" in page
    assert re.search(r"pass-key accuracy \(base \d\\u002f3\)", page)
    for row in rows:  # each setting's points: their hover text begins with its label
        label = f"cutoff {row['cutoffs']}" + (", ratio 0.5" if row["ratio"] == "0.5" else "") + (
            ", similar, proportional" if row["choice"] == "similar" else "")
        assert page.count(f'"{label}\\u003cbr\\u003espeed-up ') == 2, label


def test_frontier_refuses_a_speed_length_longer_than_the_texts(tmp_path, capsys):
    code = frontier_main(["--quick", "--out", str(tmp_path), "--texts", str(_short_text(tmp_path)),
                          "--speed-length", "600"])
    assert code == 2
    assert "--speed-length 600 needs at least that many" in capsys.readouterr().err


def _short_text(tmp_path):
    path = tmp_path / "short.txt"
    path.write_text("A short text.")
    return path


def test_pareto_front_over_three_axes_keeps_what_retrieval_alone_wins():
    rows = [dict(s=1.3, t=0.9, p=0.0), dict(s=1.3, t=0.8, p=0.9), dict(s=1.2, t=0.8, p=0.8), dict(s=1.3, t=0.9, p=None)]
    assert pareto_front(rows, ("s", "t", "p")) == [True, True, False, False]


def test_attention_grid_explores_attention_with_consecutive_beside_it():
    grid = named_grid("attention", 30, quick=False)
    choices = {s.choice for s in grid}
    assert choices == {"attention", "consecutive"}
    assert len({s.attention_window for s in grid}) >= 2 and len({s.attention_keep for s in grid}) >= 2
    assert any(len(s.cutoffs) == 3 for s in grid) and any(len(s.cutoffs) == 2 for s in grid)
    assert len(set(grid)) == len(grid)


def recorded_settings(row: dict) -> MergeSettings:
    """A setting as a frontier.json row records it (written before a field existed, it lacks it: the default)."""
    fields = {f.name for f in dataclasses.fields(MergeSettings)} - {"cutoffs"}
    values = {key: tuple(v) if isinstance(v, list) else v for key, v in row.items() if key in fields}
    return MergeSettings(cutoffs=tuple(int(c) for c in str(row["cutoffs"]).split("+")), **values)


RECORDED = sorted(path.parent.name for path in RESULTS.glob("*/frontier.json")
                  if json.loads(path.read_text())["plan"].get("grid", "default") != "presets")


@pytest.mark.parametrize("run", RECORDED)
def test_a_named_grid_is_the_grid_its_recorded_run_measured(run):
    """--grid NAME reruns what docs/measurements.md measured: the settings of its run in assets/results, in order.
    (The presets grid is the presets as they are now, not a past pass: left out.)"""
    data = json.loads((RESULTS / run / "frontier.json").read_text())
    plan = data["plan"]  # runs before the method, positions and drop twins were recorded used the defaults
    grid = beside_drop(named_grid(plan.get("grid", "default"), data["model"]["layers"], plan.get("quick", False),
                                  method=plan.get("method", "slerp"), positions=plan.get("positions", "mean")),
                       plan.get("drop_beside", False))
    assert list(grid) == [recorded_settings(row) for row in data["rows"]]


def test_every_past_grid_has_its_recorded_run():
    grids = {json.loads((RESULTS / run / "frontier.json").read_text())["plan"].get("grid", "default")
             for run in RECORDED}
    assert grids == {"default", "attention", *ATTENTION_PASSES}


def test_stretch_pyramid_and_late_grids_reach_past_the_limit_of_the_shape_before_them():
    grid = named_grid("stretch", 30, quick=False)
    assert len(set(grid)) == len(grid)
    # SmolLM2-135M's sizes: the 1.5x the grid aims at is a limit on that model.
    shape = limits.Shape(layers=30, hidden=576, intermediate=1536, heads=9, kv_heads=3, head_dim=64, vocab=49152)

    def limit(settings):
        stages = plan_stages(1024, settings.cutoffs, ratio=settings.ratio)
        return limits.prefill_flops(shape, [1024] * 30) / limits.prefill_flops(
            shape, limits.layer_lengths(1024, stages, 30))

    # the stretch pass led with the shape it set out to pass (half the pairs at 15, all at 20), under 1.4x
    assert grid[0].cutoffs == (15, 20) and grid[0].ratio == (0.5, 1.0) and limit(grid[0]) < 1.4
    assert all(limit(s) >= 1.5 for s in grid[1:])
    pyramids = named_grid("pyramid", 30, quick=False) + named_grid("late", 30, quick=False)
    assert all(limit(s) >= 1.5 and len(s.cutoffs) >= 3 and s.choice == "attention" for s in pyramids)
    assert all(s.cutoffs[0] >= 14 for s in named_grid("late", 30, quick=False))


def test_variants_grid_turns_one_lever_at_a_time_around_its_first_setting():
    grid = named_grid("variants", 30, quick=False)
    assert len(set(grid)) == len(grid)
    for setting in grid[1:]:
        changed = {f.name for f in dataclasses.fields(setting) if getattr(setting, f.name) != getattr(grid[0], f.name)}
        assert len(changed) == 1 and changed <= {"cosine_share", "proportional", "positions", "keep_end", "method"}


def test_reach_grid_sets_the_reach_on_each_of_its_shapes():
    grid = named_grid("reach", 30, quick=False)
    assert {s.attention_reach for s in grid} == {0, 4, 7} and len(set(grid)) == len(grid)
    shapes = {s.cutoffs for s in grid}
    assert len(shapes) == 2  # the recommended and the fast shape of the time
    for cutoffs in shapes:  # each shape with the reach of 7 and without
        assert {s.attention_reach for s in grid if s.cutoffs == cutoffs} >= {0, 7}


def test_share_grid_sets_the_growing_budget_on_each_of_its_shapes():
    grid = named_grid("share", 30, quick=False)
    assert {s.attention_keep_share for s in grid} == {0.0, 1 / 16} and len(set(grid)) == len(grid) == 4
    for setting in grid:  # each shape with the growing budget, and without it
        assert dataclasses.replace(setting, attention_keep_share=1 / 16 - setting.attention_keep_share) in grid
        # docs/measurements.md's reading: up to 512 tokens the budget is the fixed 32, so short-prompt figures stand.
        if setting.attention_keep_share:
            assert [setting.kept_budget(n) for n in (64, 512, 1024, 2048)] == [32, 32, 64, 128]


def test_drop_beside_gives_each_setting_its_dropping_twin_at_the_same_lengths():
    grid = named_grid("reach", 30, quick=False) + (MergeSettings(cutoffs=(15,), proportional=True),)
    paired = beside_drop(grid)
    # Every setting, then its twin: the same pairs kept by their first token; none for proportional attention.
    assert paired[0::2][:len(grid) - 1] == grid[:-1] and paired[-1] == grid[-1]
    for setting, twin in zip(paired[0:-1:2], paired[1::2]):
        assert twin == dataclasses.replace(setting, method="drop", positions="first")
    assert beside_drop(grid, drop=False) == grid


def test_presets_grid_judges_every_preset():
    from slerpviz.presets import PRESETS, recommended

    grid = named_grid("presets", 30, quick=False)
    assert len(grid) == len(PRESETS) and recommended(30) in grid


def test_frontier_without_timing_uses_the_flop_limit(tmp_path, capsys):
    out = tmp_path / "frontier"
    code = frontier_main(["--shape", "tiny", "--quick", "--grid", "attention", "--out", str(out), "--prefixes", "40",
                          "--offsets", "0,20", "--speed-length", "64", "--repeats", "0", "--continuation", "2",
                          "--retrieval-lengths", "none"])
    assert code == 0
    with open(out / "frontier.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert len(rows) == len(named_grid("attention", 4, quick=True))
    assert all(r["prefill_speedup"] == "" and float(r["prefill_speedup_limit"]) >= 1 for r in rows)
    assert all(int(r["samples"]) == 4 for r in rows)  # two texts, each from offsets 0 and 20
    assert "(by FLOP limit)" in capsys.readouterr().out
