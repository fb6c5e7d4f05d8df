"""The plot functions are pure functions of a Trace: build traces from the merge plan alone, no model needed."""

from __future__ import annotations

import base64
import hashlib
import json
import math
import random
import re
from pathlib import Path

import numpy as np
import plotly.graph_objects as go
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from slerpviz.app import pairing, pairing_data, plots, token_text
from slerpviz.engine import MergeSettings, Trace, record_plan
from slerpviz.pairs import plan_stages

LAYERS = 12


def make_trace(tokens: list[str], cutoffs=(4,), keep_start=0, keep_end=0, mode="cached", ratio=1.0,
               keep_recent=0) -> Trace:
    """A trace as the engine's new_trace builds it, from the plan alone."""
    settings = MergeSettings(cutoffs=tuple(cutoffs), keep_start=keep_start, keep_end=keep_end, keep_recent=keep_recent)
    trace = Trace(tokens=tokens, slot_tokens=[], protected=[], cutoffs=[], seq_len_per_layer=[], num_layers=LAYERS,
                  mode=mode, settings=dict(cutoffs=tuple(cutoffs), keep_start=keep_start, keep_end=keep_end,
                                           method="slerp", positions="mean", **(
                                               {"keep_recent": keep_recent} if keep_recent else {})))
    record_plan(trace, plan_stages(len(tokens), tuple(cutoffs), keep_start, settings.protected_end(len(tokens)),
                                   ratio=ratio))
    return trace


def words(n: int) -> list[str]:
    return [f" w{i}" for i in range(n)]


def traces_named(fig: go.Figure, start: str) -> list:
    return [t for t in fig.data if (t.name or "").startswith(start)]


def real_points(values) -> list:
    return [v for v in values if v is not None]


# --------------------------------------------------------------------------------------------------------------------
# Token text
# --------------------------------------------------------------------------------------------------------------------


def test_visible_token_draws_whitespace():
    assert token_text.visible_token(" the") == "·the"
    assert token_text.visible_token("\n") == "↵"
    assert token_text.visible_token("  ") == "··"
    assert token_text.visible_token("") == "∅"


def test_labels_escape_chat_markers_and_shorten():
    assert token_text.token_label("<|im_start|>") == "&lt;|im_st…"
    assert "&lt;|im_start|&gt;" in token_text.token_hover("<|im_start|>")
    assert len(token_text.token_label(" a-very-long-token", width=6)) == 6


# --------------------------------------------------------------------------------------------------------------------
# 1. Token pairing
# --------------------------------------------------------------------------------------------------------------------


def test_pairing_rows_links_and_slot_positions():
    trace = make_trace(words(11), cutoffs=(4,))
    fig = pairing.pairing_figure(trace)
    (tokens,) = traces_named(fig, "prompt tokens")
    assert list(tokens.x) == list(range(11)) and set(tokens.y) == {0}
    groups = trace.slot_tokens[0]
    pair_groups = [g for g in groups if len(g) == 2]
    (merged,) = traces_named(fig, "merged slots")
    assert list(merged.x) == [sum(g) / 2 for g in pair_groups]
    assert set(merged.y) == {-1}
    (links,) = traces_named(fig, "links of merged pairs")
    # Two links per pair, each drawn as (from, to, gap).
    assert len(real_points(links.x)) == 4 * len(pair_groups)
    singles = [g for g in groups if len(g) == 1]
    (single,) = traces_named(fig, "single slots")
    assert len(single.x) == len(singles)


def test_pairing_hover_shows_tokens_and_cosine_once_known():
    trace = make_trace(["<s>", " a", " b", " c", " d", "</s>"], cutoffs=(2,))
    before = pairing.pairing_figure(trace)
    (merged,) = traces_named(before, "merged slots")
    assert all("known once the prompt has run" in h for h in merged.hovertext)

    trace.pair_cosines = [[0.25, 0.75]]
    after = pairing.pairing_figure(trace)
    (merged,) = traces_named(after, "merged slots")
    assert "“·a” + “·b”" in merged.hovertext[0] and "pair cosine: 0.250" in merged.hovertext[0]
    assert "pair cosine: 0.750" in merged.hovertext[1]
    assert list(merged.marker.color) == [0.25, 0.75]


def test_slerp_hover_gives_the_norm_factor_over_the_mean():
    trace = make_trace(["<s>", " a", " b", "</s>"], cutoffs=(2,))
    trace.pair_cosines = [[0.0]]  # orthogonal: cos(θ/2) = cos(45°), SLERP is the mean times √2
    (merged,) = traces_named(pairing.pairing_figure(trace), "merged slots")
    assert "SLERP = mean × 1.414" in merged.hovertext[0]
    assert pairing_data.slerp_scale(0.99999) == 1.0  # nearly parallel: the merge falls back to the mean itself
    trace.settings["method"] = "lerp"
    (merged,) = traces_named(pairing.pairing_figure(trace), "merged slots")
    assert "SLERP" not in merged.hovertext[0]


def test_pairing_ignores_cosines_that_do_not_match_the_plan():
    trace = make_trace(words(8), cutoffs=(2,))
    trace.pair_cosines = [[0.5]]  # the plan has 3 pairs: a mismatch must not be drawn against the wrong slots
    assert pairing_data.stage_cosines(trace, 0) == [None] * len(trace.slot_tokens[0])


def test_protected_spans_are_shaded_and_labelled():
    trace = make_trace(words(20), cutoffs=(3,), keep_start=4, keep_end=3)
    fig = pairing.pairing_figure(trace)
    rects = [(s.x0, s.x1) for s in fig.layout.shapes if s.type == "rect"]
    assert sorted(rects) == [(-0.5, 3.5), (16.5, 19.5)]
    texts = [a.text for a in fig.layout.annotations]
    assert "protected: keep_start = 4" in texts and "protected: keep_end = 3" in texts
    (merged,) = traces_named(fig, "merged slots")
    assert all(3.5 < x < 16.5 for x in merged.x)


def test_a_recent_window_is_shaded_as_far_as_the_prompt_reaches():
    trace = make_trace(words(20), cutoffs=(3,), keep_start=4, keep_recent=5)
    fig = pairing.pairing_figure(trace)
    assert sorted((s.x0, s.x1) for s in fig.layout.shapes if s.type == "rect") == [(-0.5, 3.5), (14.5, 19.5)]
    assert "protected: the last 5 (keep_recent = 5)" in [a.text for a in fig.layout.annotations]
    short = make_trace(words(6), cutoffs=(3,), keep_start=4, keep_recent=5)  # the window takes what is left
    assert short.seq_len_per_layer[-1] == 6
    assert pairing_data.protected_spans(short) == [(0, 3, "protected: keep_start = 4"),
                                                   (4, 5, "protected: the last 2 (keep_recent = 5)")]


def test_second_stage_links_slots_of_the_first():
    trace = make_trace(words(18), cutoffs=(2, 5))
    parents = pairing_data.slot_parents(trace.slot_tokens, 1)
    first_stage = trace.slot_tokens[0]
    for slot, members in zip(trace.slot_tokens[1], parents):
        # A second-stage slot covers exactly the original tokens of the first-stage slots it merges.
        assert sorted(p for m in members for p in first_stage[m]) == slot
    fig = pairing.pairing_figure(trace)
    assert list(fig.layout.yaxis.tickvals) == [0, -1, -2]
    (second,) = traces_named(fig, "merged slots, layer 5")
    assert set(second.y) == {-2}
    assert len(second.x) == sum(len(m) == 2 for m in parents)


def test_a_layer_merged_twice_draws_its_groups_as_spans_and_names_its_rounds():
    trace = make_trace(words(14), cutoffs=(3, 3))
    # Merged twice at layer 3, the middle (tokens 1 to 12) becomes runs of four: (1..4), (5..8), (9..12).
    assert [list(g) for g in trace.slot_tokens[1]] == [[0], [1, 2, 3, 4], [5, 6, 7, 8], [9, 10, 11, 12], [13]]
    fig = pairing.pairing_figure(trace)
    rows = [t.split("<br>")[0] for t in fig.layout.yaxis.ticktext]
    assert rows == ["prompt", "after layer 3", "after layer 3, round 2"]
    (first, second) = traces_named(fig, "token spans, layer 3")
    bars = lambda t: [(t.x[i], t.x[i + 1]) for i in range(0, len(t.x), 3)]
    # Each bar runs under the tokens its slot holds: pairs on the first row, groups of four on the second.
    assert bars(second) == [(0.7, 4.3), (4.7, 8.3), (8.7, 12.3)] and set(real_points(second.y)) == {-2}
    assert len(bars(first)) == 6 and set(real_points(first.y)) == {-1}


def test_long_prompt_opens_on_a_window_with_a_range_slider():
    trace = make_trace(words(600), cutoffs=(6,))
    fig = pairing.pairing_figure(trace)
    low, high = fig.layout.xaxis.range
    assert high - low <= pairing.PAIRING_WINDOW + 1
    assert fig.layout.xaxis.rangeslider.visible
    (tokens,) = traces_named(fig, "prompt tokens")
    (rest,) = traces_named(fig, "overview: prompt tokens")
    # All tokens are there to pan to, not just the window: labelled near the view, as plain markers further on.
    assert list(tokens.x) == list(range(pairing_data.DETAIL_TOKENS)) and rest.x0 == pairing_data.DETAIL_TOKENS
    assert len(tokens.x) + len(rest.y) == 600
    # Links stay two traces whatever the length, the spans one, the overview one per kind of slot: a light figure.
    assert len(fig.data) == 9
    short = pairing.pairing_figure(make_trace(words(20)))
    assert not short.layout.xaxis.rangeslider.visible


def test_a_plan_chosen_at_the_cutoff_is_announced_not_guessed():
    # The `similar` choice plans from the hidden states, so before the prefill the trace has no groups yet.
    trace = make_trace(words(12), cutoffs=(5,))
    trace.slot_tokens, trace.protected, trace.seq_len_per_layer, trace.plan_pending = [], [], [], True
    figure = pairing.pairing_figure(trace)
    assert any("appears once the prompt has run" in a.text for a in figure.layout.annotations)
    assert [t.name for t in figure.data] == ["prompt tokens"]
    lengths = plots.length_figure(trace)
    assert list(lengths.data[0].y) == [12] * LAYERS and list(lengths.data[2].y) == []
    assert not any("of base" in a.text for a in lengths.layout.annotations)


def test_slerp_factor_only_where_t_is_one_half():
    # 2 + 2 tokens merge at t = 0.5; a 2-token slot with a single token is size-weighted away from 0.5.
    trace = make_trace(words(9), cutoffs=(1, 2))
    first, second = pairing_data.slot_parents(trace.slot_tokens, 0), pairing_data.slot_parents(trace.slot_tokens, 1)
    trace.pair_cosines = [[0.5] * sum(len(p) == 2 for p in parents) for parents in (first, second)]
    fig = pairing.pairing_figure(trace)
    (slots,) = traces_named(fig, "merged slots, layer 2")
    seen = set()
    for x, hover in zip(slots.x, slots.hovertext):
        slot = next(i for i, g in enumerate(trace.slot_tokens[1]) if sum(g) / len(g) == x)
        equal = len({len(trace.slot_tokens[0][m]) for m in second[slot]}) == 1
        assert ("SLERP = mean" in hover) == equal
        seen.add(equal)
    assert seen == {True, False}  # the prompt is chosen to have both kinds


def test_base_trace_says_nothing_is_merged():
    fig = pairing.pairing_figure(make_trace(words(6), cutoffs=()))
    assert any("nothing is merged" in a.text for a in fig.layout.annotations)
    assert len(fig.data) == 1


def test_figures_serialise_to_json():
    trace = make_trace(["<|im_start|>", "user", "\n", " hi", "<|im_end|>"], cutoffs=(1,))
    payload = json.loads(pairing.pairing_figure(trace).to_json())
    assert any(t.get("name") == "prompt tokens" for t in payload["data"])


@settings(max_examples=40, deadline=None)
@given(n=st.integers(2, 80), keep_start=st.integers(0, 6), keep_end=st.integers(0, 6),
       cutoffs=st.lists(st.integers(0, LAYERS), min_size=1, max_size=3))
def test_pairing_draws_every_token_and_slot(n, keep_start, keep_end, cutoffs):
    if keep_start + keep_end > n:
        keep_start = keep_end = 0
    trace = make_trace(words(n), tuple(cutoffs), keep_start, keep_end)
    fig = pairing.pairing_figure(trace)
    (tokens,) = traces_named(fig, "prompt tokens")
    assert len(tokens.x) == n
    for stage in range(len(trace.cutoffs)):
        row = -(stage + 1)
        slots = [t for t in fig.data if t.name.split(",")[0] in ("merged slots", "single slots") and t.y
                 and set(t.y) == {row}]
        assert sum(len(t.x) for t in slots) == len(trace.slot_tokens[stage])
        links = [t for t in fig.data if t.name.startswith("links") and set(real_points(t.y)) == {row + 1, row}]
        # Every item of the row above links to exactly one slot of this row.
        above = n if stage == 0 else len(trace.slot_tokens[stage - 1])
        assert sum(len(real_points(t.x)) for t in links) == 2 * above


# --------------------------------------------------------------------------------------------------------------------
# 2-4. Lengths, latency, KV cache
# --------------------------------------------------------------------------------------------------------------------


def test_length_figure_lines_and_attention_cost():
    merged = make_trace(words(40), cutoffs=(4, 8))
    fig = plots.length_figure(merged)
    base_line, base_bars, merged_line, merged_bars = fig.data
    assert list(base_line.y) == [40] * LAYERS
    assert list(merged_line.y) == merged.seq_len_per_layer
    assert list(merged_bars.y) == [n * n for n in merged.seq_len_per_layer]
    share = sum(n * n for n in merged.seq_len_per_layer) / (40 * 40 * LAYERS)
    assert f"merged = {share:.0%} of base" in fig.layout.annotations[1].text


def test_length_figure_uses_the_base_trace_when_given():
    merged, base = make_trace(words(10), cutoffs=(2,)), make_trace(words(10), cutoffs=())
    base.seq_len_per_layer = [10] * LAYERS
    fig = plots.length_figure(merged, base)
    assert list(fig.data[0].y) == base.seq_len_per_layer


def test_latency_figure_plots_each_step_in_ms():
    base, merged = make_trace(words(5), cutoffs=()), make_trace(words(5))
    base.generated_ids, base.prefill_s, base.decode_s = [1, 2, 3], 0.5, [0.1, 0.2]
    merged.generated_ids, merged.prefill_s, merged.decode_s = [1, 2], 0.25, [0.05]
    fig = plots.latency_figure(base, merged)
    assert [t.name for t in fig.data] == ["base", "merged"]
    assert list(fig.data[0].x) == [1, 2, 3] and list(fig.data[0].y) == pytest.approx([500, 100, 200])
    assert list(fig.data[1].y) == pytest.approx([250, 50])
    assert plots.latency_figure(make_trace(words(3)), make_trace(words(3))).data[0].x == ()


def test_kv_figure_compares_totals():
    base, merged = make_trace(words(5), cutoffs=()), make_trace(words(5))
    base.kv_bytes_per_layer = [2048] * 4
    merged.kv_bytes_per_layer = [2048, 2048, 1024, 1024]
    fig = plots.kv_figure(base, merged)
    assert list(fig.data[1].y) == [2.0, 2.0, 1.0, 1.0]
    assert "merged: 25% smaller than base" in fig.layout.title.text
    assert plots.kv_comparison(2048, 2048) == "the same size as base"
    assert plots.kv_comparison(1000, 1500) == "50% larger than base"


def test_kv_figure_explains_an_empty_cache():
    fig = plots.kv_figure(make_trace(words(5), cutoffs=(), mode="recompute"), make_trace(words(5), mode="recompute"))
    assert any("recompute mode keeps no KV cache" in a.text for a in fig.layout.annotations)


def test_a_long_prompt_pairing_plot_stays_small():
    """8k tokens of prose as the recommended preset draws them (half the pairs at the first cutoff, all at the second;
    attention colours and pair cosines known): under 300 KB as it crosses the wire (JSON inside JSON)."""
    prose = [" honeybees", " forage", " nectar", ",", " and", " the", " colony", " stores", " it", " as", " honey", "."]
    generator = random.Random(0)
    trace = make_trace([prose[i % len(prose)] for i in range(8192)], cutoffs=(15, 20), keep_start=4, keep_end=8,
                       ratio=(0.5, 1.0))
    trace.settings.update(choice="attention", ratio=(0.5, 1.0))
    trace.attention_scores = [[generator.random() / 8192 for _ in range(8192)]]
    trace.pair_cosines = [[generator.uniform(0.3, 1.0) for p in pairing_data.slot_parents(trace.slot_tokens, s)
                           if len(p) == 2]
                          for s in range(2)]
    fig = pairing.pairing_figure(trace)
    assert len(json.dumps(fig.to_json(), ensure_ascii=False).encode()) < 300_000
    # The same figure as plotly writes it, without its HTML escapes: every "/" of a base64 array as \u002f.
    assert json.loads(fig.to_json()) == json.loads(go.Figure.to_json(fig))
    assert "\\u002f" not in fig.to_json() and "\\u002f" in go.Figure.to_json(fig)
    overview = [t for t in fig.data if t.name.startswith("overview")]
    assert overview and all(t.type == "scattergl" for t in overview)
    # Every token and slot is still drawn: in full near the start, as overview markers elsewhere.
    tokens = traces_named(fig, "prompt tokens") + traces_named(fig, "overview: prompt tokens")
    assert sum(len(t.y) for t in tokens) == 8192
    for stage, cutoff in enumerate(trace.cutoffs):
        slots = [t for t in fig.data if t.name.endswith(f"slots, layer {cutoff}") and not t.name.startswith("links")]
        assert sum(len(t.x) for t in slots) == len(trace.slot_tokens[stage])


def test_a_single_latency_point_still_has_labelled_ticks():
    base, merged = make_trace(words(5), cutoffs=()), make_trace(words(5))
    base.generated_ids, base.prefill_s = [1], 0.0734
    merged.generated_ids, merged.prefill_s = [1], 0.0701
    axis = plots.latency_figure(base, merged).layout.yaxis
    low, high = axis.range
    labelled = [tick for tick in axis.tickvals if low <= math.log10(tick) <= high]
    assert len(labelled) >= 2 and min(labelled) <= 70.1 and max(labelled) >= 73.4


def test_a_detailed_window_can_start_anywhere():
    trace = make_trace(words(1000), cutoffs=(4,))
    fig = pairing.pairing_figure(trace, start=700)
    (tokens,) = traces_named(fig, "prompt tokens")
    assert list(tokens.x) == list(range(700, 700 + pairing_data.DETAIL_TOKENS))
    assert fig.layout.xaxis.range[0] == 699
    assert pairing_data.detail_span(1000, start=900) == (1000 - pairing_data.DETAIL_TOKENS, 1000)


# --------------------------------------------------------------------------------------------------------------------
# A pass key in the prompt; attention scores
# --------------------------------------------------------------------------------------------------------------------

NEEDLE_TOKENS = ["\n\n", "The", " pass", " key", " is", " ", "7", "1", "1", "5", "2", ".", " Remember", " it", ".", " ",
                 "7", "1", "1", "5", "2", " is", " the", " pass", " key", "."]


def with_needle(before: int, after: int) -> list[str]:
    return words(before) + NEEDLE_TOKENS + words(after)


def needle_of(tokens):
    from slerpviz.tasks import find_passkey

    return find_passkey(tokens)


def test_a_pass_key_is_marked_with_the_slots_it_fell_into():
    trace = make_trace(with_needle(10, 8), cutoffs=(3, 6), keep_start=2)
    needle = needle_of(trace.tokens)
    assert (needle.answer, needle.start, needle.end) == ("71152", 11, 36)
    fig = pairing.pairing_figure(trace, needle=needle)
    (rings,) = traces_named(fig, "pass key")
    assert rings.showlegend and fig.layout.showlegend
    points = list(zip(rings.x, rings.y))
    assert [x for x, y in points if y == 0] == list(range(11, 36))
    for stage in range(2):  # every slot holding a needle token is ringed, and no other
        slots = [sum(g) / len(g) for g in trace.slot_tokens[stage] if any(11 <= p < 36 for p in g)]
        assert [x for x, y in points if y == -(stage + 1)] == slots
    assert any("holds pass-key tokens" in h for h in rings.hovertext)
    bands = [(s.x0, s.x1) for s in fig.layout.shapes if s.fillcolor == pairing.NEEDLE_FILL]
    assert bands == [(10.5, 35.5)]
    assert "pass key 71152" in [a.text for a in fig.layout.annotations]
    plain = pairing.pairing_figure(trace)
    assert not traces_named(plain, "pass key") and not plain.layout.showlegend


def test_the_view_opens_on_a_pass_key_far_into_a_long_prompt():
    trace = make_trace(with_needle(700, 300), cutoffs=(4,))
    needle = needle_of(trace.tokens)
    fig = pairing.pairing_figure(trace, needle=needle)
    low, high = fig.layout.xaxis.range
    assert low < needle.start and needle.end - 1 < high and high - low <= pairing.PAIRING_WINDOW + 1
    # Outside the labelled span the needle's tokens are labelled by its own trace; inside, once only.
    (rings,) = traces_named(fig, "pass key")
    assert [t for t, y in zip(rings.text, rings.y) if y == 0] == [token_text.token_label(t) for t in NEEDLE_TOKENS[1:]]
    moved = pairing.pairing_figure(trace, start=650, needle=needle)
    assert moved.layout.xaxis.range[0] == 649
    (rings,) = traces_named(moved, "pass key")
    assert set(rings.text) == {""}


def test_attention_scores_colour_the_prompt_tokens_with_a_colour_bar():
    trace = make_trace(words(10), cutoffs=(2,))
    trace.settings["choice"] = "attention"
    scores = [0.5, 0.001, 0.002, 0.05, 0.01, 0.02, 0.3, 0.0005, 0.1, 0.0115]
    trace.attention_scores = [scores]
    fig = pairing.pairing_figure(trace)
    (tokens,) = traces_named(fig, "prompt tokens")
    assert list(tokens.marker.color) == pytest.approx([math.log10(s) for s in scores])
    assert tokens.marker.showscale and "attention" in tokens.marker.colorbar.title.text
    assert [float(t) for t in tokens.marker.colorbar.ticktext] == pytest.approx(
        [10 ** v for v in tokens.marker.colorbar.tickvals])
    assert "attention received: 0.5000" in tokens.hovertext[0]
    trace.attention_scores = [scores[:5]]  # scores that do not match the tokens are not drawn against them
    (tokens,) = traces_named(pairing.pairing_figure(trace), "prompt tokens")
    assert tokens.marker.color == plots.BASE_COLOR


def test_attention_colours_reach_the_overview_of_a_long_prompt():
    trace = make_trace(words(600), cutoffs=(4,))
    trace.attention_scores = [[1 / 600] * 599 + [0.5]]
    fig = pairing.pairing_figure(trace)
    (rest,) = traces_named(fig, "overview: prompt tokens")
    assert len(rest.marker.color) == 600 - pairing_data.DETAIL_TOKENS
    assert rest.marker.color[-1] == pytest.approx(math.log10(0.5))


def test_an_attention_plan_is_announced_as_attention():
    trace = make_trace(words(12), cutoffs=(5,))
    trace.slot_tokens, trace.protected, trace.seq_len_per_layer, trace.plan_pending = [], [], [], True
    trace.settings["choice"] = "attention"
    texts = [a.text for a in pairing.pairing_figure(trace).layout.annotations]
    assert any("<i>attention</i> choice" in t and "appears once the prompt has run" in t for t in texts)
    # Switching between the two choices planned at the cutoff redraws the plot, which names the choice.
    similar = make_trace(words(12), cutoffs=(5,))
    similar.slot_tokens, similar.protected, similar.seq_len_per_layer, similar.plan_pending = [], [], [], True
    similar.settings["choice"] = "similar"
    assert not pairing.same_pairing(similar, trace) and pairing.same_pairing(trace, trace)


# --------------------------------------------------------------------------------------------------------------------
# The figures, byte for byte: tests/app/figures.json records each case as the code drew it when the figures last
# changed on purpose (a refactoring must leave every digest as it is). After a deliberate change to a figure, write
# the record again: PYTHONPATH=. python tests/app/test_plots.py
# --------------------------------------------------------------------------------------------------------------------

FIGURES = Path(__file__).with_name("figures.json")


def figure_cases() -> dict[str, go.Figure]:
    """Every figure of the page, drawn for traces that take each path: cosines known or not, protected spans, two
    stages, a long prompt's overview, a plan still pending, the base model, a pass key near or far, attention
    colours; the lengths, latency and KV figures with and without their data."""
    cases = {"pairing plain": pairing.pairing_figure(make_trace(words(11), cutoffs=(4,))),
             "pairing default window": pairing.pairing_figure(make_trace(words(600), cutoffs=(6,))),
             "pairing protected": pairing.pairing_figure(make_trace(words(20), cutoffs=(3,), keep_start=4, keep_end=3)),
             "pairing recent": pairing.pairing_figure(make_trace(words(20), cutoffs=(3,), keep_recent=6)),
             "pairing base": pairing.pairing_figure(make_trace(words(6), cutoffs=())),
             "pairing overview": pairing.pairing_figure(make_trace(words(40), cutoffs=(3,)), window=8, detail=12),
             "pairing chat markers": pairing.pairing_figure(
                 make_trace(["<|im_start|>", "user", "\n", " hi", "<|im_end|>"], cutoffs=(1,)))}
    trace = make_trace(["<s>", " a", " b", " c", " d", "</s>"], cutoffs=(2,))
    trace.pair_cosines = [[0.25, 0.75]]
    cases["pairing cosines"] = pairing.pairing_figure(trace)
    trace = make_trace(words(9), cutoffs=(1, 2))
    trace.pair_cosines = [[0.5] * sum(len(p) == 2 for p in pairing_data.slot_parents(trace.slot_tokens, s))
                          for s in range(2)]
    cases["pairing two stages"] = pairing.pairing_figure(trace)
    cases["pairing groups, one layer merged twice"] = pairing.pairing_figure(make_trace(words(14), cutoffs=(3, 3)))
    trace = make_trace(words(60), cutoffs=(2, 5), keep_start=2, keep_end=3, ratio=(0.5, 1.0))
    trace.pair_cosines = [[0.1 * (i % 10) for i, p in enumerate(pairing_data.slot_parents(trace.slot_tokens, s))
                           if len(p) == 2]
                          for s in range(2)]
    trace.settings["choice"] = "attention"
    trace.attention_scores = [[(i % 7 + 1) / 600 for i in range(60)]]
    cases["pairing overview, attention and cosines"] = pairing.pairing_figure(trace, window=10, start=20, detail=16)
    trace = make_trace(words(12), cutoffs=(5,))
    trace.slot_tokens, trace.protected, trace.seq_len_per_layer, trace.plan_pending = [], [], [], True
    cases["pairing pending similar"] = pairing.pairing_figure(trace)
    cases["lengths pending"] = plots.length_figure(trace)
    trace.settings["choice"] = "attention"
    cases["pairing pending attention"] = pairing.pairing_figure(trace)
    trace = make_trace(with_needle(10, 8), cutoffs=(3, 6), keep_start=2)
    cases["pairing pass key"] = pairing.pairing_figure(trace, needle=needle_of(trace.tokens))
    trace = make_trace(with_needle(70, 30), cutoffs=(4,))
    cases["pairing pass key far"] = pairing.pairing_figure(trace, window=12, detail=20, needle=needle_of(trace.tokens))
    cases["pairing pass key, moved"] = pairing.pairing_figure(trace, window=12, start=60, detail=20,
                                                            needle=needle_of(trace.tokens))
    trace = make_trace(words(10), cutoffs=(2,))
    trace.settings["choice"] = "attention"
    trace.attention_scores = [[0.5, 0.001, 0.002, 0.05, 0.01, 0.02, 0.3, 0.0005, 0.1, 0.0115]]
    cases["pairing attention"] = pairing.pairing_figure(trace)
    trace.pair_cosines = [[0.9] * sum(len(p) == 2 for p in pairing_data.slot_parents(trace.slot_tokens, 0))]
    trace.settings["size_weighted"] = False
    cases["pairing attention and cosines"] = pairing.pairing_figure(trace)
    cases["lengths"] = plots.length_figure(make_trace(words(40), cutoffs=(4, 8)))
    merged, base = make_trace(words(10), cutoffs=(2,)), make_trace(words(10), cutoffs=())
    base.seq_len_per_layer = [10] * LAYERS
    cases["lengths with base"] = plots.length_figure(merged, base)
    base, merged = make_trace(words(5), cutoffs=()), make_trace(words(5))
    cases["latency empty"] = plots.latency_figure(base, merged)
    cases["kv empty"] = plots.kv_figure(base, merged)
    base.generated_ids, base.prefill_s, base.decode_s = [1, 2, 3], 0.5, [0.1, 0.2]
    merged.generated_ids, merged.prefill_s, merged.decode_s = [1, 2], 0.25, [0.05]
    cases["latency"] = plots.latency_figure(base, merged)
    base.kv_bytes_per_layer, merged.kv_bytes_per_layer = [2048] * 4, [2048, 2048, 1024, 1024]
    cases["kv"] = plots.kv_figure(base, merged)
    cases["kv recompute"] = plots.kv_figure(make_trace(words(5), cutoffs=(), mode="recompute"),
                                            make_trace(words(5), mode="recompute"))
    return cases


def points(data: dict) -> int:
    """How many points a trace draws: its x (or y) as a list or as a typed array."""
    values = data.get("x", data.get("y", []))
    if isinstance(values, dict):  # plotly's typed array: {"dtype": ..., "bdata": base64}
        return len(base64.b64decode(values["bdata"])) // np.dtype(values["dtype"]).itemsize
    return len(values)


def figure_record(fig: go.Figure) -> dict:
    """What a figure draws, readably (its traces: type, name, points; its annotations and shapes), and the digest of
    its JSON as the page receives it, which holds every array, label and setting besides."""
    payload = json.loads(fig.to_json())
    return {"traces": [[t["type"], t.get("name"), points(t)] for t in payload["data"]],
            "annotations": [a.get("text") for a in payload["layout"].get("annotations", [])],
            "shapes": len(payload["layout"].get("shapes", [])),
            "sha256": hashlib.sha256(fig.to_json().encode()).hexdigest()}


def test_every_figure_is_drawn_as_recorded():
    recorded = json.loads(FIGURES.read_text())
    drawn = {name: figure_record(fig) for name, fig in figure_cases().items()}
    assert sorted(drawn) == sorted(recorded)
    for name, record in drawn.items():
        assert {**record, "sha256": None} == {**recorded[name], "sha256": None}, name
        assert record["sha256"] == recorded[name]["sha256"], f"{name}: the same traces, but not the same JSON"


if __name__ == "__main__":
    records = {name: figure_record(fig) for name, fig in figure_cases().items()}
    # One line per trace, so a change to the record reads as a diff of what is drawn.
    text = json.dumps(records, indent=1, ensure_ascii=False)
    FIGURES.write_text(re.sub(r"\[\n\s+(\"[^\n]*\",)\n\s+(.*),\n\s+(\d+)\n\s+\]", r"[\1 \2, \3]", text) + "\n")
    print(f"wrote {FIGURES}: {len(records)} figures")
