"""python -m slerpviz.bench patch: the model's own generate, plain and under slerpviz.merging, dynamic and static."""

from __future__ import annotations

import csv
import json

import pytest

from slerpviz.bench.patched import main as patch_main


def test_patch_command_times_generate_and_counts_what_a_step_asks_of_the_host(tmp_path, capsys):
    out = tmp_path / "patch"
    assert patch_main(["--shape", "tiny", "--quick", "--lengths", "48", "--out", str(out)]) == 0
    assert "beside graph" in capsys.readouterr().out
    rows = {(row["variant"], row["cache"]): row for row in csv.DictReader(open(out / "patch.csv", newline=""))}
    assert set(rows) == {(variant, cache) for variant in ("base", "recommended") for cache in ("dynamic", "static")}
    for (variant, cache), row in rows.items():
        assert float(row["prefill_s"]) > 0 and float(row["decode_ms"]) > 0 and int(row["repeats"]) == 2
        # generate's stop check reads the device once a step; the merging forward adds no read of its own
        assert float(row["step_syncs"]) == 1
        assert float(row["decode_vs_base"]) == 1 if variant == "base" else float(row["decode_vs_base"]) > 0
    merged = rows["recommended", "static"]
    assert merged["decode_path"] == "static"
    # beside the static step (one CUDA graph on a GPU) only generate's own work and the LM head are left
    assert 0 < float(merged["ops_beside_graph"]) < float(merged["step_ops"]) / 3
    dynamic = rows["recommended", "dynamic"]
    assert dynamic["decode_path"] == "dynamic" and dynamic["ops_beside_graph"] == dynamic["step_ops"]
    data = json.loads((out / "patch.json").read_text())
    assert data["plan"]["caches"] == ["dynamic", "static"] and data["machine"]["device"] == "cpu"


def test_the_plain_model_can_leave_its_static_cache_out(tmp_path):
    # On a GPU generate compiles a plain static cache's step for a minute or two: the GPU script leaves it out.
    out = tmp_path / "patch"
    assert patch_main(["--shape", "tiny", "--quick", "--lengths", "40", "--caches", "static", "--plain-caches",
                       "dynamic", "--out", str(out)]) == 0
    rows = list(csv.DictReader(open(out / "patch.csv", newline="")))
    assert {(row["variant"], row["cache"]) for row in rows} == {("base", "dynamic"), ("recommended", "static")}
    assert all(row["decode_vs_base"] == "" for row in rows if row["variant"] != "base")  # no base static to compare



def test_a_batch_is_timed_with_both_caches_and_counts_its_tokens_a_second(tmp_path):
    out = tmp_path / "patch"
    assert patch_main(["--shape", "tiny", "--quick", "--lengths", "48", "--batches", "1,3", "--out", str(out)]) == 0
    rows = {(int(row["batch"]), row["variant"], row["cache"]): row
            for row in csv.DictReader(open(out / "patch.csv", newline=""))}
    assert set(rows) == {(batch, variant, cache) for batch in (1, 3) for variant in ("base", "recommended")
                         for cache in ("dynamic", "static")}
    assert rows[3, "recommended", "static"]["decode_path"] == "static"
    # beside the batch's static step (one CUDA graph on a GPU) only generate's own work and the LM head are left
    assert 0 < float(rows[3, "recommended", "static"]["ops_beside_graph"]) < float(
        rows[3, "recommended", "static"]["step_ops"]) / 3
    for (batch, _, _), row in rows.items():
        assert float(row["tokens_per_s"]) == pytest.approx(1000 * batch / float(row["decode_ms"]), rel=1e-3)
    # The plain model reads a padded batch's mask each step, beside generate's stop check; the merging forward
    # reads each row's position instead of the mask: no more reads than the plain model.
    assert float(rows[3, "recommended", "dynamic"]["step_syncs"]) <= float(rows[3, "base", "dynamic"]["step_syncs"]) == 2
    assert float(rows[3, "recommended", "static"]["step_syncs"]) <= 2  # the stop check, and each row's position
    assert json.loads((out / "patch.json").read_text())["plan"]["batches"] == [1, 3]
