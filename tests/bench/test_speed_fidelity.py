"""The benchmark: its limits by hand, its files and columns, and fidelity's invariants. No timing is asserted."""

import csv
import json
from dataclasses import replace

import pytest
import torch
from transformers import LlamaConfig

from conftest import tiny_engine, word_tokenizer
from slerpviz.bench import command, fidelity, limits, schedules
from slerpviz.bench.engines import random_weight_engine, shape_config
from slerpviz.bench.fidelity import (DECIDED_MARGIN, FIDELITY_COLUMNS, SUMMARY_COLUMNS, FidelityPlan, base_reference,
                                     best_combination, compare, decided_top1, earliest_cutoff, run_fidelity)
from slerpviz.bench.machine import PeakMemory
from slerpviz.bench.speed import SPEED_COLUMNS, SpeedPlan, random_prompt, run_speed
from slerpviz.bench.texts import TokenText, read_texts, tokenize
from slerpviz.engine import MergeSettings
from slerpviz.pairs import plan_stages

HAND = LlamaConfig(vocab_size=128, hidden_size=64, intermediate_size=128, num_hidden_layers=4, num_attention_heads=4,
                   num_key_value_heads=2)


@pytest.fixture(scope="module")
def tiny():
    return random_weight_engine("tiny")


def read_csv(path):
    with open(path, newline="") as f:
        reader = csv.DictReader(f)
        return reader.fieldnames, list(reader)


# ----------------------------------------------------------------------------------------------------------- limits


def test_prefill_limit_matches_a_hand_count():
    shape = limits.Shape.from_config(HAND)
    assert (shape.head_dim, shape.kv_heads, shape.layer_weights) == (16, 2, 4096 + 2048 + 2048 + 4096 + 3 * 64 * 128)
    # 10 tokens, cutoff 2 of 4 layers: first and last stay alone, the 8 between pair up -> 6 slots.
    merged = limits.layer_lengths(10, plan_stages(10, (2,)), 4)
    assert merged == [10, 10, 6, 6]
    # per layer: 2·L·36864 linear + 4·heads·head_dim·L(L+1)/2 attention; lm_head 2·64·128 on one position.
    base_layer, merged_layer = 2 * 10 * 36864 + 256 * 55, 2 * 6 * 36864 + 256 * 21
    base, merged_flops = 4 * base_layer + 16384, 2 * base_layer + 2 * merged_layer + 16384
    assert limits.prefill_flops(shape, [10] * 4) == base == 3_021_824
    assert limits.prefill_flops(shape, merged) == merged_flops == 2_414_592
    assert limits.prefill_speedup_limit(shape, [10] * 4, merged) == pytest.approx(3_021_824 / 2_414_592)
    assert limits.kv_fraction_limit([10] * 4, merged) == pytest.approx(32 / 40)


def test_layer_lengths_follow_each_stage():
    assert limits.layer_lengths(10, plan_stages(10, (1, 3)), 4) == [10, 6, 6, 4]
    assert limits.layer_lengths(10, [], 4) == [10] * 4


def test_sliding_window_caps_attention_pairs():
    assert limits.attention_pairs(10) == 55
    assert limits.attention_pairs(10, window=4) == sum(min(i + 1, 4) for i in range(10)) == 34
    assert limits.attention_pairs(10, window=64) == 55


def test_predicted_kv_bytes_equal_the_engines_cache(tiny):
    ids = torch.randint(0, 128, (1, 37))
    settings = MergeSettings(cutoffs=(1, 3))
    session = tiny.prefill(ids, settings)
    measured = sum(k.numel() * k.element_size() + v.numel() * v.element_size()
                   for k, v in ((layer.keys, layer.values) for layer in session.cache.layers))
    assert measured == sum(session.kv_bytes())
    shape = limits.Shape.from_config(tiny.config, torch.float32)
    lengths = limits.layer_lengths(37, plan_stages(37, settings.cutoffs), tiny.num_layers)
    assert session.kv_lengths() == lengths
    assert measured == limits.kv_bytes(shape, lengths)


def test_decode_limits_are_above_one_and_below_prefills():
    shape = limits.Shape.from_config(HAND)
    merged = limits.layer_lengths(512, plan_stages(512, (1,)), 4)
    cached = limits.cached_decode_speedup_limit(shape, [512] * 4, merged, 8)
    assert 1 < cached < limits.prefill_speedup_limit(shape, [512] * 4, merged)
    steps = [([n] * 4, limits.layer_lengths(n, plan_stages(n, (1,)), 4)) for n in range(513, 520)]
    assert limits.recompute_decode_speedup_limit(shape, steps) > 1


def test_mistral_7b_shape_is_mistral_7b():
    shape = limits.Shape.from_config(shape_config("mistral-7b"), torch.bfloat16)
    assert (shape.layers, shape.hidden, shape.heads, shape.kv_heads, shape.head_dim) == (32, 4096, 32, 8, 128)
    assert (shape.intermediate, shape.vocab, shape.sliding_window, shape.bytes_per_value) == (14336, 32000, None, 2)
    # about 7.2e9 parameters: the decoder's weights plus the embedding and lm_head
    params = shape.layers * shape.layer_weights + 2 * shape.vocab * shape.hidden
    assert 7.0e9 < params < 7.4e9


def test_mistral_7b_engine_builds_on_the_meta_device():
    engine = random_weight_engine("mistral-7b", device="meta", dtype=torch.bfloat16)
    assert engine.num_layers == 32 and engine.decoder.embed_tokens.weight.dtype == torch.bfloat16
    assert engine.eos_ids == set()  # random weights: a speed run never stops early


# -------------------------------------------------------------------------------------------------------- schedules


def test_schedules_parse_and_check():
    assert schedules.parse("0, 15+7,15") == [(0,), (7, 15), (15,)]
    assert schedules.label((7, 15)) == "7+15" and schedules.label(()) == "base"
    with pytest.raises(ValueError):
        schedules.parse("x")
    with pytest.raises(ValueError):
        schedules.check([(31,)], 30)
    assert schedules.speed_defaults(30, quick=False) == [(0,), (7,), (15,), (22,), (7, 15), (7, 15, 22)]
    assert (30,) in schedules.fidelity_defaults(30, quick=False)


# ------------------------------------------------------------------------------------------------------------ speed


def test_run_speed_rows(tiny):
    plan = SpeedPlan(lengths=(16, 40), schedules=((2,), (1, 3)), repeats=2, new_tokens=3, recompute_new_tokens=2,
                     merge_repeats=2, warmup=False)
    result = run_speed(tiny, plan, log=lambda m: None)
    assert len(result.rows) == 2 * 2 * 2 and len(result.repeats) == 2 * 2 * 3 * 2
    for row in result.rows:
        assert set(SPEED_COLUMNS) <= set(row)
        for key in ("ttft_speedup", "ttft_speedup_limit", "decode_speedup", "decode_speedup_limit", "merge_share"):
            assert row[key] > 0, key
        assert row["ttft_speedup_limit"] > 1
        if row["mode"] == "cached":
            assert row["kv_fraction"] == pytest.approx(row["kv_fraction_limit"])  # the cache really is shorter
            assert row["kv_fraction"] < 1
        else:
            assert row["kv_fraction"] is None and row["kv_fraction_limit"] is None
    merged = {(r["length"], r["schedule"]): r["merged_length"] for r in result.rows}
    # 16 tokens -> 1 + 7 pairs + 1 = 9 slots -> 1 + 3 pairs + 1 left over + 1 = 6 slots
    assert merged == {(16, "2"): 9, (16, "1+3"): 6, (40, "2"): 21, (40, "1+3"): 12}
    assert [s["length"] for s in result.hf_sanity] == [16, 40]


def test_speed_command_writes_files(tmp_path, capsys):
    out = tmp_path / "speed"
    assert command.main(["speed", "--shape", "tiny", "--quick", "--lengths", "24,48", "--out", str(out)]) == 0
    header, rows = read_csv(out / "speed.csv")
    assert header == list(SPEED_COLUMNS)
    assert {r["mode"] for r in rows} == {"cached", "recompute"} and {r["length"] for r in rows} == {"24", "48"}
    assert {r["schedule"] for r in rows} == {"2", "1+2"}  # --quick on 4 layers: N/2 and N/4+N/2
    assert all(float(r["ttft_speedup"]) > 0 and float(r["ttft_speedup_limit"]) > 1 for r in rows)
    payload = json.loads((out / "speed.json").read_text())
    assert {"platform", "cpu", "torch", "device", "command"} <= set(payload["machine"])
    assert payload["model"]["name"] == "tiny (random weights)" and payload["plan"]["repeats"] == 3
    html = (out / "speed.html").read_text()
    assert "plotly" in html.lower() and "limit" in html
    printed = capsys.readouterr().out
    assert "TTFT base s" in printed and "speed.csv" in printed


def test_bad_cutoff_is_refused(tmp_path, capsys):
    assert command.main(["speed", "--shape", "tiny", "--cutoffs", "9", "--out", str(tmp_path)]) == 2
    assert "out of range" in capsys.readouterr().err


# --------------------------------------------------------------------------------------------------------- fidelity


def test_fidelity_command_writes_files(tmp_path):
    out = tmp_path / "fidelity"
    argv = ["fidelity", "--shape", "tiny", "--quick", "--cutoffs", "0,2,4", "--prefixes", "12,30", "--out", str(out)]
    assert command.main(argv) == 0
    header, rows = read_csv(out / "fidelity.csv")
    assert header == list(FIDELITY_COLUMNS)
    assert len(rows) == 2 * 2 * 3 * 4 * 3  # texts × prefixes × schedules × methods × positions
    for row in rows:
        assert 0 <= float(row["top1"]) <= 1 and 0 <= float(row["top5_overlap"]) <= 1 and float(row["kl"]) >= 0
        assert 0 <= int(row["tokens_to_divergence"]) <= 4
    # Merging after the last layer changes nothing: the base model exactly.
    for row in (r for r in rows if r["schedule"] == "4"):
        assert (row["top1"], row["top5"], float(row["kl"]), row["censored"]) == ("1", "1", 0.0, "True")
    assert any(float(r["kl"]) > 0 for r in rows if r["schedule"] == "0")  # merging embeddings does change things
    header, summary = read_csv(out / "fidelity_summary.csv")
    assert header == list(SUMMARY_COLUMNS) and len(summary) == 3 * 4 * 3
    payload = json.loads((out / "fidelity.json").read_text())
    assert payload["best"]["method"] in ("slerp", "lerp", "slerp-dir", "seed-2024")
    assert len(payload["best"]["ranking"]) == 4 * 3 and payload["texts"][0]["name"] == "random-1"
    assert "plotly" in (out / "fidelity.html").read_text().lower()


def test_fidelity_grid_over_pair_choice_and_proportional_attention(tiny):
    texts = [TokenText("ids", torch.randint(0, 128, (1, 24), generator=torch.Generator().manual_seed(2)))]
    plan = FidelityPlan(prefixes=(24,), schedules=((1,), (1, 3)), methods=("slerp",), positions=("mean",),
                        choices=("consecutive", "similar"), proportional=(False, True), ratio=0.5, continuation=2)
    rows = run_fidelity(tiny, texts, plan, log=lambda m: None)
    assert {(r["choice"], r["proportional"]) for r in rows} == {
        ("consecutive", False), ("consecutive", True), ("similar", False), ("similar", True)}
    assert len(rows) == 2 * 4 and all(r["ratio"] == 0.5 for r in rows)
    labels = {fidelity.variant_label(r) for r in rows}
    assert labels == {"slerp/mean", "slerp/mean/proportional", "slerp/mean/similar", "slerp/mean/similar/proportional"}
    result = fidelity.fidelity_result(rows, tiny.num_layers, 0.5)
    assert result["best"]["label"] in labels and len(result["summary"]) == 2 * 4


@pytest.mark.parametrize("merge", [
    MergeSettings(choice="similar", ratio=1.0, proportional=True),
    # A kept budget of 16 of 40 tokens leaves far fewer pairs free than the ratio asks for.
    MergeSettings(choice="attention", ratio=1.0, attention_keep=16, attention_reach=2),
], ids=["similar", "attention-kept-budget"])
def test_speed_takes_its_limits_from_the_plan_that_ran(tiny, merge):
    # issue 21, item 5: the limit of a variant planned from the hidden states is that plan's, not the consecutive
    # plan's with the same ratio (which merges all 19 eligible pairs of 40 tokens, to 21 slots).
    plan = SpeedPlan(lengths=(40,), schedules=((2,),), modes=("cached", "recompute"), repeats=1, new_tokens=3,
                     recompute_new_tokens=2, merge_repeats=1, merge=merge, warmup=False)
    rows = run_speed(tiny, plan, log=lambda m: None).rows
    cached = next(r for r in rows if r["mode"] == "cached")
    session = tiny.prefill(random_prompt(tiny, 40, plan.seed), replace(merge, cutoffs=(2,)))
    assert cached["merged_length"] == session.stages[-1].plan.merged_length > 21
    assert cached["kv_fraction"] == pytest.approx(cached["kv_fraction_limit"])  # limit and cache are one plan
    assert all(r["merged_length"] == cached["merged_length"] for r in rows)
    assert cached["merge_ms"] > 0 and cached["merge_syncs"] == 1  # the count depends on the data: one read


def test_speed_times_named_presets_beside_schedules(tiny):
    from slerpviz import presets

    recommended = presets.recommended(tiny.num_layers)
    plan = SpeedPlan(lengths=(48,), schedules=((2,),), modes=("cached",), repeats=1, new_tokens=2, merge_repeats=1,
                     warmup=False, named=(("recommended", recommended),))
    rows = run_speed(tiny, plan, log=lambda m: None).rows
    assert [r["schedule"] for r in rows] == ["2", "recommended"]
    row = rows[1]
    assert row["stages"] == len(recommended.cutoffs) and row["first_cutoff"] == recommended.cutoffs[0]
    assert row["merge_syncs"] <= row["stages"] and row["merge_ops_per_stage"] > 0
    assert row["base_decode_syncs"] == 0 and row["merged_decode_syncs"] == 0  # a decode step reads nothing back
    assert row["merge_gpu_ms"] is None  # no GPU here


def test_divergence_counts_tokens_up_to_the_first_difference():
    engine = tiny_engine("llama")
    ids = torch.randint(3, 96, (1, 20), generator=torch.Generator().manual_seed(1))
    reference = base_reference(engine, ids, 6)
    same = compare(engine, ids, MergeSettings(cutoffs=(engine.num_layers,)), reference)
    assert same["tokens_to_divergence"] == 6 and same["censored"] and same["kl"] == 0.0
    changed = list(reference.continuation)
    changed[2] = (changed[2] + 1) % 96  # the base "said" something else at step 2
    broken = type(reference)(reference.log_probs, changed)
    diverged = compare(engine, ids, MergeSettings(cutoffs=(engine.num_layers,)), broken)
    assert diverged["tokens_to_divergence"] == 2 and not diverged["censored"]


def test_top1_where_the_base_had_decided_leaves_out_its_near_ties():
    engine = tiny_engine("llama")
    ids = torch.randint(3, 96, (1, 20), generator=torch.Generator().manual_seed(1))
    reference = base_reference(engine, ids, 1)
    probs = reference.log_probs.exp().sort(descending=True).values
    row = compare(engine, ids, MergeSettings(cutoffs=(engine.num_layers,)), reference)
    assert row["base_margin"] == pytest.approx(float(probs[0] - probs[1]), abs=1e-6) and row["base_margin"] >= 0
    rows = [{"top1": 0.0, "base_margin": DECIDED_MARGIN / 2}, {"top1": 1.0, "base_margin": DECIDED_MARGIN},
            {"top1": 0.0, "base_margin": 0.5}, {"top1": 1.0, "base_margin": 0.9}]
    assert decided_top1(rows) == {"decided_samples": 3, "top1_decided": pytest.approx(2 / 3)}
    assert decided_top1(rows[:1]) == {"decided_samples": 0, "top1_decided": None}


def test_texts_file_is_split_and_short_prefixes_skipped(tmp_path):
    words = " ".join(f"w{i}" for i in range(3, 60))
    (tmp_path / "mine.txt").write_text(f"{words}\n---\nw5 w6 w7 w8 w9 w10\n")
    texts = read_texts([tmp_path / "mine.txt"])
    assert [name for name, _ in texts] == ["mine#1", "mine#2"]
    token_texts = tokenize(word_tokenizer(), texts)
    assert [t.ids.shape[-1] for t in token_texts] == [57, 6]
    engine = tiny_engine("mistral")
    plan = FidelityPlan(prefixes=(5, 40), schedules=((3,),), methods=("slerp",), positions=("mean",), continuation=3)
    rows = run_fidelity(engine, token_texts, plan, log=lambda m: None)
    assert [(r["text"], r["prefix"]) for r in rows] == [("mine#1", 5), ("mine#1", 40), ("mine#2", 5)]
    with pytest.raises(ValueError, match="long enough"):
        run_fidelity(engine, token_texts, replace(plan, prefixes=(100,)), log=lambda m: None)


def test_default_texts_are_long_enough():
    texts = read_texts()
    assert len(texts) >= 5
    assert all(len(text.split()) > 900 for _, text in texts)


def test_best_variant_ranks_by_kl_at_each_merging_cutoff():
    def row(schedule, method, positions, top1, kl):
        return {"schedule": schedule, "stages": 1, "first_cutoff": int(schedule), "method": method,
                "positions": positions, "choice": "consecutive", "proportional": False, "top1": top1, "kl_mean": kl,
                "tokens_to_divergence_mean": 1.0}

    summary = [
        # cutoff 4 of 4 merges nothing (all equal the base); seed-2024 listed first would take rank 1 there
        row("4", "seed-2024", "first", 1.0, 0.0), row("4", "slerp", "mean", 1.0, 0.0),
        row("4", "lerp", "mean", 1.0, 0.0),
        row("1", "slerp", "mean", 0.5, 1.0), row("2", "slerp", "mean", 0.9, 0.1), row("3", "slerp", "mean", 1.0, 0.0),
        row("1", "lerp", "mean", 0.5, 1.2), row("2", "lerp", "mean", 0.9, 0.2), row("3", "lerp", "mean", 1.0, 0.1),
        row("1", "seed-2024", "first", 0.6, 0.9), row("2", "seed-2024", "first", 0.8, 0.3),
        row("3", "seed-2024", "first", 0.9, 0.4),
    ]
    best = best_combination(summary, num_layers=4)
    assert (best["method"], best["positions"], best["label"]) == ("slerp", "mean", "slerp/mean")
    assert best["kl_rank"] == pytest.approx(4 / 3)
    # lerp and seed-2024 tie on KL rank (7/3) once cutoff 4 is left out; the lower mean KL goes first
    assert [r["method"] for r in best["ranking"]] == ["slerp", "lerp", "seed-2024"]
    assert earliest_cutoff(summary, best, 4, threshold=0.95) == 3
    assert earliest_cutoff(summary, best, 4, threshold=0.85) == 2
    assert earliest_cutoff(summary, best["ranking"][-1], 4, threshold=0.95) is None


# ----------------------------------------------------------------------------------------------------------- memory


def test_peak_memory_sees_a_large_allocation():
    memory = PeakMemory(torch.device("cpu"))
    if memory.kind is None:
        pytest.skip("this system cannot reset its peak resident set")
    memory.start()
    block = torch.ones(64 * 2**20 // 4)  # 64 MiB, touched
    peak = memory.peak()
    del block
    assert peak >= 48 * 2**20


def test_speed_times_a_preset_with_its_attention_scoring_in_the_merge_share(tmp_path):
    from slerpviz.presets import recommended

    out = tmp_path / "speed"
    assert command.main(["speed", "--shape", "tiny", "--quick", "--lengths", "48", "--modes", "cached",
                         "--preset", "recommended", "--method", "lerp", "--out", str(out)]) == 0
    rows = list(csv.DictReader(open(out / "speed.csv")))
    expected = recommended(4)
    assert {r["schedule"] for r in rows} == {"recommended"}  # the preset alone, not --quick's default schedules
    assert all(int(r["first_cutoff"]) == expected.cutoffs[0] and int(r["stages"]) == len(expected.cutoffs)
               for r in rows)
    assert all(float(r["merge_ms"]) > 0 and 0 < float(r["merge_share"]) < 1 for r in rows)
    ((name, plan),) = json.loads((out / "speed.json").read_text())["plan"]["named"]
    assert name == "recommended"
    assert plan["choice"] == expected.choice and plan["attention_window"] == expected.attention_window
    assert plan["method"] == "lerp"  # the preset replaces the merge flags, not how its slots are made


def test_speed_times_each_decode_for_base_and_merged_alike(tiny):
    plan = SpeedPlan(lengths=(40,), schedules=((2,),), modes=("cached",), repeats=1, new_tokens=3, merge_repeats=1,
                     warmup=False, decodes=("dynamic", "static"))
    result = run_speed(tiny, plan, log=lambda m: None)
    assert [(r["decode"], r["schedule"]) for r in result.rows] == [("dynamic", "2"), ("static", "2")]
    paths = {(r["decode"], r["variant"]): r["decode_path"] for r in result.repeats}
    assert paths == {("dynamic", "base"): "dynamic", ("dynamic", "2"): "dynamic",
                     ("static", "base"): "static", ("static", "2"): "static"}
    static = result.rows[1]
    assert static["merged_decode_syncs"] == 0 and static["base_decode_syncs"] == 0
    assert static["merged_decode_setup_s"] > 0  # the decoder's setup, apart from the steps


def test_speed_times_the_compiled_prefill_beside_the_eager_one(tmp_path, fresh_dynamo):
    # The command line end to end, inductor and all: its compile is reported apart, and both paths are timed for
    # base and merged alike in one run.
    out = tmp_path / "speed"
    assert command.main(["speed", "--shape", "tiny", "--lengths", "48", "--cutoffs", "2", "--modes", "cached",
                         "--repeats", "1", "--new-tokens", "2", "--prefill", "eager,compiled",
                         "--out", str(out)]) == 0
    rows = list(csv.DictReader(open(out / "speed.csv")))
    assert [(r["prefill"], r["schedule"]) for r in rows] == [("eager", "2"), ("compiled", "2")]
    report = json.loads((out / "speed.json").read_text())
    assert report["decode_compile_s"]["prefill"] > 0
    assert {(r["prefill"], r["variant"]) for r in report["repeats"]} == {
        ("eager", "base"), ("eager", "2"), ("compiled", "base"), ("compiled", "2")}
    # What a prefill dispatches: inductor fuses the norms, RoPE and activations, so fewer aten ops reach the host.
    eager, compiled = rows
    assert int(compiled["base_prefill_ops"]) < int(eager["base_prefill_ops"])
    assert int(compiled["merged_prefill_ops"]) < int(eager["merged_prefill_ops"])
    assert int(eager["merged_prefill_syncs"]) >= int(eager["base_prefill_syncs"]) == 0
    assert command.main(["speed", "--shape", "tiny", "--prefill", "fused", "--out", str(out)]) == 2
