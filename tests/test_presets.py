"""Presets at every depth: one layer per stage, in order, for any model from 12 to 80 layers and on the page."""

from __future__ import annotations

import types

import pytest

from slerpviz import presets
from slerpviz.merge import ratio_per_stage
from slerpviz.settings import MergeSettings
from slerpviz.models import ALLOWED_MODELS, EMBEDDED

# num_hidden_layers of every allow-listed model, from each one's config.json on the hub (nothing is downloaded here).
DEPTHS = {
    EMBEDDED: 30,
    "mistralai/Mistral-7B-Instruct-v0.2": 32,
    "HuggingFaceTB/SmolLM2-135M-Instruct": 30,
    "HuggingFaceTB/SmolLM2-360M-Instruct": 32,
    "HuggingFaceTB/SmolLM2-1.7B-Instruct": 24,
    "Qwen/Qwen2.5-0.5B-Instruct": 24,
    "Qwen/Qwen2.5-1.5B-Instruct": 28,
    "Qwen/Qwen2.5-7B-Instruct": 28,
}


def check_stages(settings, preset: presets.Preset, num_layers: int) -> None:
    cutoffs = settings.cutoffs
    assert len(cutoffs) == len(preset.depth_shares)  # one stage per share: none lost to a shared layer
    # Distinct shares get distinct layers, in order; a share written twice is one layer merged twice.
    shares = sorted(preset.depth_shares)
    for (a, share_a), (b, share_b) in zip(zip(cutoffs, shares), zip(cutoffs[1:], shares[1:])):
        assert a < b if share_a < share_b else a == b, (cutoffs, shares)
    assert 1 <= cutoffs[0] and cutoffs[-1] < num_layers  # every stage merges before the last layer
    assert all(abs(c - share * num_layers) <= 1 for c, share in zip(cutoffs, preset.depth_shares)), cutoffs
    assert len(ratio_per_stage(settings.ratio, len(cutoffs))) == len(cutoffs)


@pytest.mark.parametrize("name", sorted(presets.PRESETS))
def test_every_preset_gives_distinct_increasing_cutoffs_at_every_depth_from_12_to_80(name):
    preset = presets.PRESETS[name]
    for num_layers in range(12, 81):
        check_stages(presets.preset(name, num_layers), preset, num_layers)


def test_a_preset_keeps_the_layers_its_shares_round_to_where_they_do_not_collide():
    # Moving a stage is only for shares that round to one layer: elsewhere each cutoff is its share, rounded.
    for name, preset in presets.PRESETS.items():
        for num_layers in range(12, 81):
            rounded = [round(share * num_layers) for share in preset.depth_shares]
            if len(set(rounded)) == len(rounded):
                assert list(presets.preset(name, num_layers).cutoffs) == rounded, (name, num_layers)


def test_shares_given_out_of_order_keep_their_ratios_when_they_share_a_layer():
    # 0.6 and 0.57 of 24 both round to 14: the larger share takes the next layer, and each keeps its own ratio.
    settings = presets.Preset("test", (0.6, 0.57, 0.2), MergeSettings(ratio=(1.0, 0.5, 0.25))).settings(24)
    assert settings.cutoffs == tuple(sorted(set(settings.cutoffs))) and len(settings.cutoffs) == 3
    by_share = dict(zip((0.2, 0.57, 0.6), zip(settings.cutoffs, settings.ratio)))
    assert by_share[0.57][0] < by_share[0.6][0] and [r for _, r in by_share.values()] == [0.25, 0.5, 1.0]


def test_a_share_written_twice_is_one_layer_merged_twice_at_every_depth():
    preset = presets.Preset("test", (0.4, 0.4, 0.41, 0.6), MergeSettings(ratio=(0.5, 0.5, 1.0, 1.0)))
    for num_layers in range(12, 81):
        first, again, next_share, last = preset.settings(num_layers).cutoffs
        # 0.41 rounds to 0.4's layer on every depth here: it takes the next layer, while the repeated 0.4 stays.
        assert first == again < next_share < last, (num_layers, first, again, next_share, last)


def test_the_allow_list_depths_are_all_known():
    assert set(DEPTHS) == set(ALLOWED_MODELS)


@pytest.mark.parametrize("model", ALLOWED_MODELS)
def test_the_pages_preset_menu_fills_every_preset_the_page_accepts_for_every_allowed_model(model):
    """Through the page's own fill (Page.fill_preset, for the loaded model's depth) and its own parse: the preset
    comes back whole, a ratio per cutoff, where a shared layer made the page refuse it ("4 ratios for 3 cutoffs")."""
    from slerpviz.app import callbacks, form
    from slerpviz.app.resident import ResidentModel

    page = callbacks.Page()
    page.resident = ResidentModel()
    page.resident.install(model, types.SimpleNamespace(num_layers=DEPTHS[model]))  # the depth is all the fill reads
    for name, preset in presets.PRESETS.items():
        values = dict(zip(form.MERGE_FIELDS, page.fill_preset(name)))
        request = form.parse(form.Form(prompt="Why is the sky blue?", model=model, chat=True, mode="cached",
                                       max_new_tokens=8, temperature=0.0, seed=0, **values))
        assert request.settings == presets.preset(name, DEPTHS[model])
        check_stages(request.settings, preset, DEPTHS[model])


def test_a_preset_is_a_merge_settings_template_with_its_cutoffs_placed():
    # Every setting but the cutoffs is the template's own: a field MergeSettings gains is a preset's too.
    import dataclasses

    for name, preset in presets.PRESETS.items():
        assert isinstance(preset.merge, MergeSettings) and preset.merge.cutoffs == ()
        for num_layers in (24, 30, 32):
            placed = presets.preset(name, num_layers)
            assert placed == dataclasses.replace(preset.merge, cutoffs=placed.cutoffs)
    with pytest.raises(ValueError, match="a preset's cutoffs are its depth shares"):
        presets.Preset("test", (0.5,), MergeSettings(cutoffs=(15,)))
    # frontier's grids write theirs as shape and fields: the same preset.
    assert presets.from_fields("t", (0.5, 0.67), (0.5, 1.0), "attention", 8, 32, attention_reach=7).merge == \
        MergeSettings(ratio=(0.5, 1.0), choice="attention", attention_window=8, attention_keep=32, attention_reach=7)
