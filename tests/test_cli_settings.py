"""The command line's merge settings: --preset, the attention choice and its flags, on a tiny model (no download)."""

from __future__ import annotations

import dataclasses
import json

import pytest

from slerpviz import cli, models, presets
from slerpviz.settings import MergeSettings
from tests.conftest import tiny_engine

PROMPT = " ".join(f"w{i % 90}" for i in range(3, 43))  # 40 words of the tiny models' vocabulary


@pytest.fixture(scope="module")
def tiny():
    return tiny_engine("llama")


@pytest.fixture
def run(tiny, monkeypatch, capsys):
    """`python -m slerpviz generate --json ...` on the tiny model: the parsed JSON result."""
    monkeypatch.setattr(models, "load", lambda name, **options: tiny)

    def run(*args: str) -> dict:
        assert cli.main(["generate", "--prompt", PROMPT, "--no-chat", "--max-new-tokens", "2", "--json", *args]) == 0
        return json.loads(capsys.readouterr().out)

    return run


def as_json(settings) -> dict:
    return json.loads(json.dumps(dataclasses.asdict(settings)))


def test_a_preset_supplies_every_merge_setting(run, tiny):
    result = run("--preset", "recommended")
    # Read at run time: whatever slerpviz.presets recommends now, for this model's depth.
    assert result["preset"] == "recommended"
    assert result["plan"]["settings"] == as_json(presets.recommended(tiny.num_layers))
    if result["plan"]["settings"]["choice"] == "attention":
        assert len(result["plan"]["attention_scores"][0]) == len(result["plan"]["tokens"])


def test_merge_flags_given_with_a_preset_override_that_setting(run, tiny):
    result = run("--preset", "article", "--ratio", "0.5", "--choice", "attention", "--attention-window", "4",
                 "--attention-keep", "3", "--attention-keep-share", "0.4", "--attention-reach", "1",
                 "--keep-start", "1")
    expected = dataclasses.replace(presets.preset("article", tiny.num_layers), ratio=0.5, choice="attention",
                                   attention_window=4, attention_keep=3, attention_keep_share=0.4, attention_reach=1,
                                   keep_start=1)
    assert result["plan"]["settings"] == as_json(expected)
    # The flags reached the engine: the most-attended tokens, 0.4 of the prompt (more than 3), stayed alone.
    scores, groups = result["plan"]["attention_scores"][0], result["plan"]["groups"][0]
    budget = expected.kept_budget(len(scores))
    assert budget > 3
    top = sorted(range(len(scores)), key=lambda i: -scores[i])[:budget]
    assert all([t] in groups for t in top)


def test_text_output_names_the_preset_and_the_attention_settings(tiny, monkeypatch, capsys):
    monkeypatch.setattr(models, "load", lambda name, **options: tiny)
    assert cli.main(["generate", "--prompt", PROMPT, "--no-chat", "--max-new-tokens", "1", "--preset", "article",
                     "--choice", "attention", "--attention-window", "8"]) == 0
    # The library's one description of a setting (slerpviz.settings.describe), as the benchmarks label variants.
    cutoffs = "+".join(map(str, presets.preset("article", tiny.num_layers).cutoffs))
    keep = presets.preset("article", tiny.num_layers).attention_keep
    assert f"(preset article: cutoff {cutoffs}, attention, W 8, keep top {keep})" in capsys.readouterr().out


def test_a_per_cutoff_preset_with_other_cutoffs_asks_for_ratios(monkeypatch, capsys):
    monkeypatch.setattr(models, "load", lambda *args, **kwargs: pytest.fail("the model was loaded for bad input"))
    monkeypatch.setitem(presets.PRESETS, "two", presets.Preset("two stages", (0.25, 0.5), MergeSettings(ratio=(0.5, 1.0))))
    assert cli.main(["generate", "--prompt", "hi", "--preset", "two", "--cutoff", "3"]) == 2
    err = capsys.readouterr().err
    assert err == "error: preset two gives one merge ratio per cutoff (0.5, 1), and --cutoff gives 1 cutoffs: " \
                  "give --ratio too\n"


def test_a_presets_ratios_meet_its_replacement_cutoffs_in_layer_order():
    # --preset recommended has ratios (0.5, 1) for its two cutoffs in layer order: given cutoffs 20 then 10, layer
    # 10 gets 0.5, as with 10 then 20 (once the order of the flags swapped them).
    parse = cli.build_parser().parse_args
    for order in (["10", "20"], ["20", "10"]):
        args = parse(["generate", "--prompt", "hi", "--preset", "recommended", "--cutoff", order[0], "--cutoff",
                      order[1]])
        settings = cli.merge_settings(args, 30)
        assert settings.cutoffs == (10, 20) and settings.ratio == (0.5, 1.0)


def test_help_says_flags_override_a_preset(capsys):
    with pytest.raises(SystemExit):
        cli.main(["generate", "--help"])
    text = " ".join(capsys.readouterr().out.split())
    assert "a merge flag given with it" in text and "overrides that one setting" in text
    for name, preset in presets.PRESETS.items():
        assert f"{name}: {' '.join(preset.description.split())}" in text
