"""bench locate: the attention choice's score at every layer of the unmerged prompt, and where the needle ranks."""

import csv
import json

import pytest
import torch
from conftest import TINY, random_ids

from slerpviz.bench import command
from slerpviz.bench.locate import LOCATE_COLUMNS, locate_row, needle_ranks, summarise
from slerpviz.tasks import Prompt
from slerpviz.engine import MergeSettings, Sampling

LAYERS = TINY["num_hidden_layers"]


@pytest.mark.parametrize("cutoff", [1, 3, LAYERS - 1])
def test_each_layer_scores_what_a_merge_at_that_cutoff_scores(engine, cutoff):
    """Row c is the very score a merged prefill with its cutoff at c reads to choose its pairs (the trace's first
    stage), for every family: the tool shows what the attention choice would see there."""
    ids = random_ids(37, seed=3)
    by_layer = engine.attention_by_layer(ids, window=5)
    assert by_layer.shape == (LAYERS, 37)
    settings = MergeSettings(cutoffs=(cutoff,), ratio=0.5, choice="attention", attention_window=5, attention_keep=0)
    run = engine.start(ids, settings, Sampling(max_new_tokens=1))
    for _ in run:
        pass
    torch.testing.assert_close(by_layer[cutoff], torch.tensor(run.trace.attention_scores[0]), atol=1e-5, rtol=1e-4)
    assert not torch.allclose(by_layer[cutoff], by_layer[cutoff - 1])  # each layer its own projections


def test_needle_ranks_count_from_the_most_attended():
    scores = torch.tensor([0.1, 0.4, 0.05, 0.3, 0.15])
    assert needle_ranks(scores, 0, 5) == [3, 0, 4, 1, 2]
    assert needle_ranks(scores, 1, 3) == [0, 4]
    assert needle_ranks(torch.tensor([0.2, 0.2, 0.2]), 0, 3) == [0, 1, 2]  # ties: the earlier first


def test_a_row_gives_the_median_rank_as_a_share_and_the_share_found():
    length = 64
    scores = torch.arange(length, 0, -1).float()  # token i has rank i
    prompt = Prompt("passkey", length, 0.5, 0, torch.zeros(1, length, dtype=torch.long), "12345", 2, 8)
    row = locate_row(prompt, 4, scores)
    assert set(LOCATE_COLUMNS) == set(row)
    assert row["needle_tokens"] == 6 and row["median_rank"] == 4.5 and row["rank_share"] == 4.5 / 64
    assert row["found"] == pytest.approx(2 / 6)  # ranks 2 and 3 are within the first 64 / 16 = 4
    summary = summarise([row, {**row, "sample": 1, "found": 1.0, "rank_share": 0.5}])
    assert summary == [{"task": "passkey", "length": 64, "layer": 4, "n": 2,
                        "rank_share": pytest.approx((4.5 / 64 + 0.5) / 2), "found": pytest.approx((2 / 6 + 1) / 2)}]


def test_command_writes_a_row_per_prompt_and_layer(tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["locate", "--shape", "tiny", "--lengths", "600,700", "--depths", "0,1", "--samples", "1",
            "--attention-window", "4", "--out", str(out)]
    assert command.main(argv) == 0
    payload = json.loads((out / "locate.json").read_text())
    layers = payload["model"]["layers"]
    rows = list(csv.DictReader(open(out / "locate.csv")))
    assert tuple(rows[0]) == LOCATE_COLUMNS
    assert len(rows) == 2 * 2 * 2 * 1 * layers  # tasks x lengths x depths x samples x layers
    assert sorted({int(r["layer"]) for r in rows}) == list(range(layers))
    assert all(0 <= float(r["rank_share"]) < 1 and 0 <= float(r["found"]) <= 1 for r in rows)
    summary = list(csv.DictReader(open(out / "locate_summary.csv")))
    assert len(summary) == 2 * 2 * layers and {r["n"] for r in summary} == {"2"}
    assert payload["machine"]["command"].startswith("python -m slerpviz.bench locate")
    assert payload["plan"]["window"] == 4
    assert "plotly" in (out / "locate.html").read_text()
    printed = capsys.readouterr().out
    assert "passkey 600 (n=2): rank / found" in printed


@pytest.mark.parametrize("argv, message", [
    (["--lengths", "5000"], "does not fit the model's context"),
    (["--tasks", "needle"], "unknown task"),
    (["--depths", "0,1.5"], "between 0 and 1"),
])
def test_bad_input_exits_2_with_one_line(tmp_path, capsys, argv, message):
    assert command.main(["locate", "--shape", "tiny", "--out", str(tmp_path), *argv]) == 2
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("error:")]
    assert len(errors) == 1 and message in errors[0] and "Traceback" not in err
