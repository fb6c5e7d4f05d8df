"""python -m slerpviz.bench groups: a group of k tokens merged as the engine merges it, against the normalised mean
with the norm restored."""

from __future__ import annotations

import csv
import json

import pytest
import torch

from slerpviz.bench.groups import iterated, main as groups_main, normalised_mean


def test_a_group_is_the_tokens_the_engine_merged_into_one_slot():
    hidden = torch.randn(1, 21, 8, generator=torch.Generator().manual_seed(1))
    for size in (2, 4, 8):
        merged, members = iterated(hidden, size, "lerp")
        # Lerp at the engine's weights is the plain mean of the group's tokens: the members are the right ones.
        assert members.shape[1] == size and merged.shape[0] == members.shape[0] > 0
        assert torch.allclose(merged, members.mean(1), atol=1e-5)
    # Two tokens by slerp-dir are exactly the normalised mean with the norm restored.
    merged, members = iterated(hidden, 2, "slerp-dir")
    assert torch.allclose(merged, normalised_mean(members), atol=1e-5)


def test_groups_command_writes_a_row_per_text_layer_size_and_method(tmp_path, capsys):
    out = tmp_path / "groups"
    assert groups_main(["--shape", "tiny", "--quick", "--tokens", "40", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "n groups" in printed and "norm ratio" in printed
    rows = list(csv.DictReader(open(out / "groups.csv", newline="")))
    assert len(rows) == 2 * 1 * 3 * 3  # two texts, one layer (--quick), sizes 2, 4, 8, three methods
    for row in rows:
        assert int(row["groups"]) > 0 and -1 <= float(row["cos_min"]) <= float(row["cos_mean"]) <= 1 + 1e-6
        if row["method"] == "lerp":  # the plain mean is shorter than the mean of the norms
            assert float(row["norm_ratio_mean"]) < 1
        if row["method"] == "slerp-dir":
            assert float(row["norm_ratio_mean"]) == pytest.approx(1, abs=1e-4)
    data = json.loads((out / "groups.json").read_text())
    assert data["benchmark"] == "groups" and data["plan"]["sizes"] == [2, 4, 8] and data["summary"]


@pytest.mark.parametrize("flag, value, message", [("--sizes", "3", "powers of two"), ("--layers", "99", "0 to 4")])
def test_groups_refuses_what_it_cannot_measure(flag, value, message, tmp_path, capsys):
    assert groups_main(["--shape", "tiny", "--quick", flag, value, "--out", str(tmp_path / "g")]) == 2
    assert message in capsys.readouterr().err
