"""The app: its callbacks called directly, then the launched app through gradio_client on 127.0.0.1."""

from __future__ import annotations

import json
import random
import threading
import time

import gradio as gr
import pytest
import torch
from gradio.components.plot import PlotData
from gradio_client.exceptions import AppError

from conftest import PAGE_PROMPT, page_defaults
from slerpviz import presets
from slerpviz.app import callbacks, form, layout, panels
from slerpviz.engine import Run, Trace, interleave
from slerpviz.app.resident import ResidentModel
from slerpviz.models import EMBEDDED
from slerpviz.settings import MergeSettings

PROMPT = PAGE_PROMPT
# The page's inputs, by name, in the order the callbacks take them.
DEFAULTS = page_defaults(max_new_tokens=6)


def inputs(**changes) -> list:
    return list({**DEFAULTS, **changes}.values())


@pytest.fixture(scope="module")
def engine(app_engine):
    return app_engine  # here `engine` is the app's (conftest's default is a tiny model per family)


@pytest.fixture
def closed_runs(monkeypatch):
    """Every Run closed from now on, recorded with its trace."""
    closed, original = [], Run.close

    def recording_close(run):
        closed.append(run.trace)
        original(run)

    monkeypatch.setattr(Run, "close", recording_close)
    return closed


def figure(plot) -> dict:
    """A plot as Plotly JSON, whichever way it came: a Figure from a callback, PlotData from the stream, a dict from
    the client."""
    if isinstance(plot, dict):
        return json.loads(plot["plot"])
    if isinstance(plot, PlotData):
        return json.loads(plot.plot)
    return json.loads(plot.to_json())


def plot_trace_names(plot) -> list[str]:
    return [trace.get("name") for trace in figure(plot)["data"]]


def annotation_texts(plot) -> list[str]:
    return [a.get("text", "") for a in figure(plot)["layout"].get("annotations", [])]


class FakeEngine:
    """What the resident model needs of an engine: a name to show and a warm-up to count."""

    num_layers = 4

    def __init__(self, name: str = "engine"):
        self.name, self.warm_ups = name, 0

    def warm_up(self):
        self.warm_ups += 1


# --------------------------------------------------------------------------------------------------------------------
# The library parts of the page
# --------------------------------------------------------------------------------------------------------------------


def test_cutoffs_parse_from_slider_list_and_text():
    # A layer given again merges again there (groups of up to four tokens), so it is kept, in order.
    assert form.parse_cutoffs(15, [20, 15]) == (15, 15, 20)
    assert form.parse_cutoffs(10.0, "25, 20") == (10, 20, 25)
    with pytest.raises(ValueError, match="further cutoff must be a whole number"):
        form.parse_cutoffs(10, "twenty")
    with pytest.raises(ValueError, match=r"cutoff must be a whole number, 0 or more \(got 2.5\)"):
        form.parse_cutoffs(2.5, [])
    with pytest.raises(ValueError, match=r"cutoff must be a whole number, 0 or more \(got None\)"):
        form.parse_cutoffs(None, None)


@pytest.mark.parametrize("changes, message", [
    (dict(prompt="   "), "the prompt is empty"),
    (dict(model="gpt2"), "not on the allow-list"),
    (dict(method="average"), "unknown merge method"),
    (dict(mode="fast"), "unknown mode"),
    (dict(keep_start=1.5), "keep start must be a whole number"),
    (dict(choice="random"), "unknown pair choice"),
])
def test_parse_request_refuses_bad_inputs(changes, message):
    with pytest.raises(ValueError, match=message):
        form.parse_request(*inputs(**changes))


def test_parse_request_builds_engine_settings():
    request = form.parse_request(*inputs(more_cutoffs=[20], keep_start=3, keep_end=2.0, method="lerp",
                                       max_new_tokens=12.0, temperature=0.7, seed=5, ratio=0.5, choice="uniform",
                                       proportional=True))
    assert request.settings.cutoffs == (15, 20)
    assert (request.settings.keep_start, request.settings.keep_end, request.settings.method) == (3, 2, "lerp")
    assert (request.settings.ratio, request.settings.choice, request.settings.proportional) == (0.5, "uniform", True)
    assert (request.sampling.max_new_tokens, request.sampling.temperature, request.sampling.seed) == (12, 0.7, 5)


def test_parse_request_takes_the_attention_settings_and_ratios_per_cutoff():
    request = form.parse_request(*inputs(choice="attention", attention_window=16.0, attention_keep="4",
                                       more_cutoffs=[20], ratios="0.5; 1", attention_reach="3"))
    settings = request.settings
    assert (settings.choice, settings.attention_window, settings.attention_keep) == ("attention", 16, 4)
    assert settings.attention_reach == 3
    assert settings.cutoffs == (15, 20) and settings.ratio == (0.5, 1.0)
    assert form.parse_request(*inputs(ratio=0.25, ratios="")).settings.ratio == 0.25  # empty: the slider's
    assert form.parse_request(*inputs(more_cutoffs=[20], ratios="0.5")).settings.ratio == 0.5  # one: for all


def test_each_panel_says_how_its_decode_steps_ran():
    trace = finished_trace(" 71152")
    assert "| decode |" not in panels.panel_markdown(trace)  # before its prefill a run has no decode path yet
    trace.decode, trace.decode_warmup_s = "graph", 0.42
    assert "| decode | CUDA graph (one launch a token) · set up in 0.42 s, in no step's time |" in (
        panels.panel_markdown(trace))
    trace.decode, trace.decode_warmup_s = "dynamic (the session was prefilled without a cache)", 0.0
    assert "| decode | dynamic (the session was prefilled without a cache) |" in panels.panel_markdown(trace)


def test_the_decode_rate_is_the_median_steps_so_a_few_slow_ones_do_not_move_it():
    trace = finished_trace(" 71152")
    trace.prefill_s, trace.decode_s = 0.5, [0.05, 0.05, 0.05, 0.05, 0.5]  # one step the browser drew over
    figures = panels.panel_figures(trace)
    assert figures.tokens_per_s == pytest.approx(20.0)  # a mean would say 7.1
    assert figures.elapsed_s == pytest.approx(1.2)  # what the steps took in all still counts every one
    assert "| tokens per second (median decode step) | 20.0 |" in panels.panel_markdown(trace)


def test_agreement_position_by_position():
    assert panels.agreement([1, 2, 3], [1, 2, 3]) == panels.Agreement(None, 3, 3)
    assert panels.agreement([1, 2, 3, 4], [1, 9, 3, 4]) == panels.Agreement(1, 3, 4)
    stopped = panels.agreement([1, 2], [1, 2, 5, 6])  # one stopped early: the missing tokens disagree
    assert stopped.first_difference == 2 and stopped.share == 0.5


class FakeRun:
    def __init__(self, name: str, steps: int, log: list):
        self.name, self.steps, self.log, self.closed = name, steps, log, False

    def __next__(self):
        if self.steps == 0:
            raise StopIteration
        self.steps -= 1
        self.log.append(self.name)
        return self.name

    def close(self):
        self.closed = True


def test_interleave_with_an_order_lets_a_coin_choose_who_steps_first_each_round():
    log = []
    base, merged = FakeRun("base", 40, log), FakeRun("merged", 40, log)
    pairs = list(interleave(base, merged, order=random.Random(0)))
    assert pairs == [("base", "merged")] * 40  # the tuples keep the runs' order
    rounds = [tuple(log[i:i + 2]) for i in range(0, len(log), 2)]
    assert set(rounds) == {("base", "merged"), ("merged", "base")}  # each steps once a round, either first
    assert 10 <= rounds.count(("base", "merged")) <= 30


def test_interleave_alternates_and_lets_the_longer_run_finish():
    log = []
    base, merged = FakeRun("base", 2, log), FakeRun("merged", 4, log)
    pairs = list(interleave(base, merged))
    assert log == ["base", "merged", "base", "merged", "merged", "merged"]
    assert pairs == [("base", "merged"), ("base", "merged"), (None, "merged"), (None, "merged")]
    assert base.closed and merged.closed


def test_closing_interleave_closes_both_runs():
    base, merged = FakeRun("base", 10, []), FakeRun("merged", 10, [])
    pairs = interleave(base, merged)
    next(pairs)
    pairs.close()
    assert base.closed and merged.closed and base.steps == merged.steps == 9


def test_the_resident_model_streams_progress_and_shares_one_load():
    release, calls, engine = threading.Event(), [], FakeEngine()

    def loader(name, progress):
        calls.append(name)
        progress(f"fetching {name}")
        release.wait(10)
        return engine

    resident = ResidentModel(loader)
    first = resident.switch(EMBEDDED, poll=0.01)
    assert next(first) in (f"fetching {EMBEDDED}", f"Loading {EMBEDDED}")
    # A second caller during the load follows it instead of starting another.
    follower = threading.Thread(target=resident.ensure, args=(EMBEDDED,))
    follower.start()
    release.set()
    list(first)
    follower.join(10)
    assert calls == [EMBEDDED] and resident.name == EMBEDDED and resident.engine is engine
    assert list(resident.switch(EMBEDDED)) == []  # loaded: nothing to wait for


def test_the_resident_model_reports_a_failed_load_and_tries_again_later():
    attempts = []

    def loader(name, progress):
        attempts.append(name)
        raise OSError("no network")

    resident = ResidentModel(loader)
    for _ in range(2):
        with pytest.raises(OSError, match="no network"):
            resident.ensure(EMBEDDED)
    assert len(attempts) == 2 and resident.engine is None
    assert panels.message_for(OSError("no network")) == "Could not load the model: no network"


def test_messages_for_errors_are_short_and_clear():
    assert panels.message_for(torch.OutOfMemoryError("CUDA out of memory")).startswith("Out of memory")
    assert panels.message_for(ValueError("cutoff 40 is out of range")) == "cutoff 40 is out of range"


PASSKEY_TOKENS = ["<s>", "Filler", ".", "\n\n", "The", " pass", " key", " is", " ", "7", "1", "1", "5", "2", ".",
                  " Remember", " it", ".", " ", "7", "1", "1", "5", "2", " is", " the", " pass", " key", ".", "\n\n",
                  "What", " is", " the", " pass", " key", "?", " The", " pass", " key", " is"]


def finished_trace(text: str, tokens=PASSKEY_TOKENS) -> Trace:
    return Trace(tokens=list(tokens), slot_tokens=[], protected=[], cutoffs=[], seq_len_per_layer=[], num_layers=4,
                    mode="cached", settings={}, generated_ids=[1, 2, 3], text=text, finished=True)


@pytest.mark.parametrize("base_text, merged_text, verdict", [
    (" 71152.", " 71152. The", "both found it"),
    (" 71152.", " 7115.", "base found it, merged did not"),
    (" 12345", " 71152", "merged found it, base did not"),
    (" the pass key", " 711520", "neither found it"),
])
def test_the_comparison_says_whether_each_side_found_the_pass_key(base_text, merged_text, verdict):
    comparison = panels.comparison_markdown(finished_trace(base_text), finished_trace(merged_text), str)
    assert comparison.endswith(f"**Pass key 71152**: {verdict}.")


def test_no_pass_key_no_verdict():
    tokens = ["<s>", "Why", " is", " the", " sky", " blue", "?"]
    comparison = panels.comparison_markdown(finished_trace(" 71152", tokens), finished_trace(" 71152", tokens), str)
    assert "Pass key" not in comparison and "agree position by position" in comparison


# --------------------------------------------------------------------------------------------------------------------
# The callbacks, called directly on the embedded model
# --------------------------------------------------------------------------------------------------------------------


def example_index(page, label: str) -> int:
    return next(i for i, example in enumerate(page.examples) if example.label.startswith(label))


def as_request(values: dict):
    """The values an example or preset filled in, sent back as the page sends them."""
    return form.parse_request(*inputs(**{k: v for k, v in values.items() if k in DEFAULTS}))


def test_examples_and_the_preset_button_read_the_preset_when_clicked(page, engine, monkeypatch):
    fields = (*form.EXAMPLE_FIELDS, *form.MERGE_FIELDS)
    for label in ("Why is the sky blue? Recommended preset", "Find the pass key (~1,500 tokens)"):
        values = dict(zip(fields, page.fill_example(example_index(page, label))))
        assert as_request(values).settings == presets.recommended(engine.num_layers)
    # Whatever the preset says at click time, not a copy taken earlier: two stages, a ratio each, spans kept.
    monkeypatch.setitem(presets.PRESETS, "recommended", presets.Preset("test", (0.5, 0.25), MergeSettings(
        ratio=(1.0, 0.5), choice="similar", attention_window=7, attention_keep=2, keep_start=3, keep_end=5)))
    expected = presets.recommended(engine.num_layers)
    values = dict(zip(fields, page.fill_example(example_index(page, "Why is the sky blue? Recommended"))))
    assert values["ratios"] == "0.5, 1" and as_request(values).settings == expected
    values = dict(zip(form.MERGE_FIELDS, page.fill_preset()))
    assert as_request(values).settings == expected


def test_the_preset_menu_fills_in_each_preset_and_ignores_an_unknown_name(page, engine):
    for name in presets.PRESETS:
        values = dict(zip(form.MERGE_FIELDS, page.fill_preset(name)))
        assert as_request(values).settings == presets.preset(name, engine.num_layers)
    assert all(output == gr.skip() for output in page.fill_preset("fastest"))


def test_the_fast_pass_key_example_reads_the_fast_preset(page, engine):
    values = dict(zip((*form.EXAMPLE_FIELDS, *form.MERGE_FIELDS),
                      page.fill_example(example_index(page, "Same pass key, fast preset"))))
    assert as_request(values).settings == presets.preset("fast", engine.num_layers)
    assert len(presets.preset("fast", engine.num_layers).cutoffs) == 4 and values["chat"] is False


def test_the_pass_key_example_is_raw_text_ending_in_the_question(page):
    values = dict(zip((*form.EXAMPLE_FIELDS, *form.MERGE_FIELDS),
                      page.fill_example(example_index(page, "Find the pass key (~1,500 tokens)"))))
    assert values["chat"] is False and values["prompt"].endswith("What is the pass key? The pass key is")
    assert values["max_new_tokens"] >= 8  # a space and five digits, one token each at worst
    assert all(output == gr.skip() for output in page.fill_example(99))


def test_the_page_says_what_each_preset_is(engine):
    demo = layout.build_app(EMBEDDED, preload=False)
    config = demo.get_config_file()
    # A short line each beside the controls; what each does in full behind a click.
    (note,) = [c["props"]["value"] for c in config["components"] if c["props"].get("elem_id") == "preset-note"]
    for name, preset in presets.PRESETS.items():
        assert preset.summary and "\n" not in preset.summary and len(preset.summary) <= 90, name
        assert f"**{name}**: {preset.summary}" in note and preset.description not in note
    (details,) = [c["props"] for c in config["components"] if c["props"].get("elem_id") == "preset-details"]
    assert details["open"] is False
    (full,) = [c["props"]["value"] for c in config["components"] if c["props"].get("elem_id") == "preset-details-text"]
    assert all(f"**{name}**: {preset.description}" in full for name, preset in presets.PRESETS.items())
    (menu,) = [c for c in config["components"] if c["props"].get("elem_id") == "preset-name"]
    assert [choice[1] for choice in menu["props"]["choices"]] == list(presets.PRESETS)
    (examples,) = [c for c in config["components"] if c["props"].get("elem_id") == "examples"]
    labels = examples["props"]["sample_labels"]
    assert "Find the pass key (~1,500 tokens), recommended preset" in labels
    assert any(label.startswith("Same pass key, fast preset") for label in labels)
    assert "Why is the sky blue? Recommended preset" in labels
    # The example list and the preset button fill the controls in the order the callbacks return their values.
    fns = {getattr(fn.fn, "__name__", None): fn for fn in demo.fns.values()}
    merge = ["Cutoff layer", "Further cutoffs (optional)", "Keep start", "Keep end", "Method", "Positions",
             "Merge ratio", "Ratio per cutoff (optional)", "Pair choice", "Proportional attention",
             "Attention window W", "Keep most attended", "Reach", "Kept share of a long prompt", "Keep recent"]
    assert [c.label for c in fns["fill_example"].outputs] == ["Prompt", "Chat template", "Mode", "Max new tokens",
                                                               *merge]
    assert [c.label for c in fns["fill_preset"].outputs] == merge
    assert [c.elem_id for c in fns["fill_preset"].inputs] == ["preset-name"]  # the preset menu, nothing else
    assert fns["fill_preset"].api_visibility == "private"


def opened_values(opened) -> dict:
    """The merge fields a page opening set, as the page then sends them."""
    values = {field: getattr(opened, field) for field in form.MERGE_FIELDS}
    values["cutoff"], values["more_cutoffs"] = values["cutoff"]["value"], values["more_cutoffs"]["value"]
    return values


def test_the_page_opens_on_the_recommended_preset_for_the_loaded_model(engine):
    """Not on the article's setting (cutoff 15, every pair merged), which loses the answer every time: the first Run
    shows the setting the README stands behind, the one the preset menu names."""
    demo = layout.build_app(EMBEDDED, preload=False)
    fns = {getattr(fn.fn, "__name__", None): fn for fn in demo.fns.values()}
    blocks = {getattr(b, "elem_id", None): b for b in demo.blocks.values()}
    assert blocks["preset-name"].value == "recommended"
    merge = [c.label for c in fns["fill_preset"].outputs]
    assert [c.label for c in fns["on_open"].outputs] == ["Status", "Model", *merge]  # in OpeningControls' order
    # The model loaded: one message, the preset for its depth.
    page = callbacks.Page()
    (opened,) = list(page.on_open(EMBEDDED))
    assert opened.status.startswith("**Ready**") and opened.cutoff["maximum"] == engine.num_layers
    assert as_request(opened_values(opened)).settings == presets.recommended(engine.num_layers)
    # The model still loading: the preset at once, for the depth known then, and again for the loaded model's.
    release = threading.Event()

    def loader(name, progress):
        release.wait(30)
        return FakeEngine(name)

    page.resident = ResidentModel(loader)
    opening = page.on_open(EMBEDDED)
    first = next(opening)
    assert first.status.startswith("**Loading")
    assert as_request(opened_values(first)).settings == presets.recommended(callbacks.DEFAULT_LAYERS)
    release.set()
    *_, last = opening
    assert last.status.startswith("**Ready**") and last.cutoff["maximum"] == FakeEngine.num_layers
    assert as_request(opened_values(last)).settings == presets.recommended(FakeEngine.num_layers)


SHORT_PASSKEY = ("There is a pass key hidden in this text. Remember it.\n\nThe grass is green. The sky is blue.\n\n"
                 "The pass key is 48213. Remember it. 48213 is the pass key.\n\nThe sun is warm. Birds sing in the "
                 "morning.\n\nWhat is the pass key? The pass key is")


def test_a_pass_key_prompt_under_the_attention_choice(page, engine):
    chosen = dict(prompt=SHORT_PASSKEY, chat=False, cutoff=8, choice="attention", ratio=0.5, attention_window=8,
                  attention_keep=2, max_new_tokens=7)
    *_, (pairing, lengths, status) = page.plan(*inputs(**chosen))
    assert "*attention* choice" in status and "**pass key 48213**" in status
    view = callbacks.PageView()
    *_, last = page.generate(*inputs(**chosen), view=view)
    base, merged = view.base, view.merged
    found = {(True, True): "both found it", (False, False): "neither found it",
             (True, False): "base found it, merged did not", (False, True): "merged found it, base did not"}[
        ("48213" in base.text, "48213" in merged.text)]
    assert last[4].endswith(f"**Pass key 48213**: {found}.")
    # The window and the budget reached the engine: the two most-attended tokens stayed alone.
    scores = merged.attention_scores[0]
    assert merged.settings["attention_window"] == 8 and len(scores) == merged.prompt_length
    top = sorted(range(len(scores)), key=lambda i: -scores[i])[:2]
    assert all([i] in merged.slot_tokens[0] for i in top)
    drawn = figure(last[5])
    (rings,) = [t for t in drawn["data"] if t["name"] == "pass key"]
    assert 0 in rings["y"] and -1 in rings["y"]
    tokens = next(t for t in drawn["data"] if t["name"] == "prompt tokens")
    assert "attention" in tokens["marker"]["colorbar"]["title"]["text"]



def test_plan_draws_the_pairing_before_generating(page, engine):
    *_, (pairing, lengths, status) = page.plan(*inputs(keep_start=4, keep_end=2))
    n = engine.encode(PROMPT).shape[-1]
    trace = engine.new_trace(engine.encode(PROMPT), form.parse_request(*inputs(keep_start=4, keep_end=2)).settings)
    tokens = next(t for t in pairing.data if t.name == "prompt tokens")
    assert len(tokens.x) == n
    assert f"{n} prompt tokens → {len(trace.slot_tokens[0])} after layer 15" in status
    assert any("keep_start = 4" in a.text for a in pairing.layout.annotations)
    assert list(lengths.data[2].y) == trace.seq_len_per_layer


def generating(outputs) -> list:
    return [o for o in outputs if isinstance(o[9], str) and o[9].startswith("**Generating")]


def test_generate_streams_both_sides_token_by_token(page, monkeypatch):
    monkeypatch.setattr(callbacks, "SHOW_EVERY_S", 0.0)
    outputs = list(page.generate(*inputs(more_cutoffs=[20])))
    steps = generating(outputs)
    assert len(steps) == DEFAULTS["max_new_tokens"]
    for side in (0, 1):
        texts = [o[side] for o in steps]
        assert all(later.startswith(earlier) for earlier, later in zip(texts, texts[1:]))
        assert len(texts[-1]) > len(texts[0]) > 0
    base_text, merged_text, base_stats, merged_stats, comparison, pairing, lengths, latency, kv, status = outputs[-1]
    assert status.startswith("**Done**")
    assert "at every layer" in base_stats and "| tokens generated | 6 · done |" in base_stats
    assert "after layer 15 → " in merged_stats and "after layer 20" in merged_stats
    assert "smaller than base" in merged_stats
    assert "agree position by position" in comparison
    assert {"base", "merged"} <= set(plot_trace_names(latency)) and {"base", "merged"} <= set(plot_trace_names(kv))
    merged_slots = next(t for t in figure(pairing)["data"] if t["name"] == "merged slots, layer 15")
    assert all("pair cosine: " in h and "known once" not in h for h in merged_slots["hovertext"])


def test_the_page_is_updated_at_most_every_so_often_but_always_after_the_prompt_and_at_the_end(page, monkeypatch):
    """Each update is drawn while the runs step, and charged to whichever side steps next: a message after each of
    the 16 steps here would put a drawing on some side's clock 16 times."""
    monkeypatch.setattr(callbacks, "SHOW_EVERY_S", 3600.0)
    outputs = list(page.generate(*inputs(max_new_tokens=16, chat=False, prompt="Once upon a time")))
    steps = generating(outputs)
    assert len(steps) == 1 and "| tokens generated | 1 |" in steps[0][2]  # the first token, then nothing till the end
    assert outputs[-1][9].startswith("**Done**") and "| tokens generated | 16 · done |" in outputs[-1][2]
    assert len(outputs[-1][0]) > len(steps[0][0])


def test_similar_choice_shows_its_pairing_once_the_prompt_has_run(page):
    *_, (pairing, lengths, status) = page.plan(*inputs(choice="similar", ratio=0.5))
    assert "once the prompt has run" in status
    assert [t.name for t in pairing.data] == ["prompt tokens"]
    outputs = list(page.generate(*inputs(choice="similar", ratio=0.5, max_new_tokens=2)))
    first_step = next(o for o in outputs if isinstance(o[9], str) and o[9].startswith("**Generating"))
    merged_slots = next(t for t in figure(first_step[5])["data"] if t["name"] == "merged slots, layer 15")
    assert len(merged_slots["x"]) > 0 and all("pair cosine: " in h for h in merged_slots["hovertext"])
    assert "after layer 15" in outputs[-1][3]


def test_generate_recompute_mode_has_no_kv_cache(page):
    *_, last = page.generate(*inputs(mode="recompute", max_new_tokens=1, chat=False, prompt="Once upon a time"))
    assert "none (recompute mode" in last[3]
    assert any("recompute mode keeps no KV cache" in text for text in annotation_texts(last[8]))


@pytest.mark.parametrize("changes, message", [
    (dict(prompt=""), "the prompt is empty"),
    (dict(cutoff=31), "cutoff 31 is out of range"),
    (dict(more_cutoffs=["99"]), "cutoff 99 is out of range"),
    (dict(keep_start=300, keep_end=200), "longer than the prompt"),
    (dict(max_new_tokens=9000), "max new tokens must be a whole number from 1 to 512"),
    (dict(max_new_tokens=300, prompt="word " * 8000, chat=False), "longer than the model's context"),
    (dict(model="openai/gpt-oss"), "not on the allow-list"),
])
def test_bad_inputs_become_page_messages(page, changes, message):
    for callback in (page.plan, page.generate):
        with pytest.raises(gr.Error, match=message):
            list(callback(*inputs(**changes)))


def test_preview_reports_problems_in_the_status_line(page):
    pairing, lengths, status = page.preview(*inputs(keep_end=500))
    assert status.startswith("**Cannot plan**") and "longer than the prompt" in status


def test_out_of_memory_is_a_page_message(page, monkeypatch):
    def exhausted(request, stop=None):
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        yield  # a generator, like the real one

    monkeypatch.setattr(callbacks, "generation_traces", exhausted)
    with pytest.raises(gr.Error, match="Out of memory"):
        list(page.generate(*inputs()))


def test_closing_the_stream_stops_both_generations(page, closed_runs):
    stream = page.generate(*inputs(max_new_tokens=40))
    for output in stream:
        if output[0] and output[1] and len(output[0]) > 10:
            break
    stream.close()
    assert len(closed_runs) == 2
    base, merged = closed_runs
    assert not base.finished and not merged.finished
    assert abs(len(base.generated_ids) - len(merged.generated_ids)) <= 1
    assert len(base.generated_ids) < 40


def test_load_model_fits_the_cutoff_controls(page, engine):
    *_, (status, model, cutoff, more) = page.load_model(EMBEDDED, 99, [3, 45])
    assert status.startswith("**Ready**") and model["value"] == EMBEDDED
    assert cutoff["maximum"] == engine.num_layers and cutoff["value"] == engine.num_layers
    assert more["choices"] == list(range(engine.num_layers + 1)) and more["value"] == [3]


def test_app_flags_and_environment(monkeypatch):
    import app

    monkeypatch.setenv("SLERPVIZ_PORT", "7999")
    defaults = app.parse_args([])
    assert (defaults.host, defaults.port, defaults.share, defaults.model) == (None, 7999, False, None)
    chosen = app.parse_args(["--host", "0.0.0.0", "--port", "9000", "--share", "--model", EMBEDDED])
    assert (chosen.host, chosen.port, chosen.share, chosen.model) == ("0.0.0.0", 9000, True, EMBEDDED)
    with pytest.raises(SystemExit):
        app.parse_args(["--model", "some/unlisted-model"])


# --------------------------------------------------------------------------------------------------------------------
# The launched app, through gradio_client
# --------------------------------------------------------------------------------------------------------------------


def test_api_names_the_endpoints(client):
    endpoints = client.view_api(print_info=False, return_format="dict")["named_endpoints"]
    assert {"/generate", "/plan"} <= set(endpoints)


def test_client_streams_growing_text_and_plotly_figures(client):
    job = client.submit(*inputs(), api_name="/generate")
    outputs = list(job)
    streamed = [o for o in outputs if isinstance(o[9], str) and o[9].startswith("**Generating")]
    assert len(streamed) >= 2
    for side in (0, 1):
        texts = [o[side] for o in streamed]
        assert all(later.startswith(earlier) for earlier, later in zip(texts, texts[1:]))
        assert len(texts[-1]) > len(texts[0])
    last = outputs[-1]
    assert last[9].startswith("**Done**") and "agree" in last[4]
    assert {"prompt tokens", "merged slots, layer 15"} <= set(plot_trace_names(last[5]))
    assert set(plot_trace_names(last[6])) == {"base", "merged"}
    assert plot_trace_names(last[7]) == ["base", "merged"] and plot_trace_names(last[8]) == ["base", "merged"]
    assert all(last[i]["type"] == "plotly" for i in (5, 6, 7, 8))


def test_client_plan_returns_the_pairing_plot(client, engine):
    pairing, lengths, status = client.predict(prompt="Hello there", chat=False, cutoff=2, api_name="/plan")
    n = engine.encode("Hello there", chat=False).shape[-1]
    figure = json.loads(pairing["plot"])
    tokens = next(t for t in figure["data"] if t["name"] == "prompt tokens")
    assert len(tokens["x"]) == n and f"{n} prompt tokens" in status


@pytest.mark.parametrize("changes, message", [
    (dict(prompt=""), "the prompt is empty"),
    (dict(more_cutoffs=[31]), "cutoff 31 is out of range"),
    (dict(keep_start=500), "longer than the prompt"),
    (dict(max_new_tokens=500, prompt="word " * 7900, chat=False), "longer than the model's context"),
])
def test_client_gets_error_messages_and_the_app_keeps_serving(client, changes, message):
    with pytest.raises(AppError, match=message):
        client.predict(*inputs(**changes), api_name="/generate")
    pairing, lengths, status = client.predict(prompt="Still here?", api_name="/plan")
    assert "prompt tokens" in status


def test_client_cancel_stops_both_generations(client, closed_runs):
    job = client.submit(*inputs(max_new_tokens=200), api_name="/generate")
    for output in job:
        if isinstance(output[9], str) and output[9].startswith("**Generating") and len(output[1]) > 10:
            break
    job.cancel()
    deadline = time.monotonic() + 60
    while len(closed_runs) < 2 and time.monotonic() < deadline:
        time.sleep(0.1)
    assert len(closed_runs) == 2
    assert not any(trace.finished for trace in closed_runs)
    assert all(len(trace.generated_ids) < 200 for trace in closed_runs)
    # The device is free again for the next request.
    last = client.predict(*inputs(max_new_tokens=2, chat=False), api_name="/generate")
    assert last[9].startswith("**Done**")
