"""The app against hostile or unlucky use: model switches, bad values from any client, uploads, Stop, long prompts."""

from __future__ import annotations

import json
import math
import re
import threading
import uuid
from pathlib import Path

import gradio as gr
import httpx
import pytest
from gradio.components.plot import PlotData
from gradio_client.exceptions import AppError

from conftest import PAGE_PROMPT, page_defaults
from slerpviz.app import admission, callbacks, form, layout
from slerpviz.engine import Sampling
from slerpviz.app import resident as resident_module
from slerpviz.app.resident import RESIDENT, ResidentModel, SwitchRefused
from slerpviz.models import EMBEDDED
from slerpviz.presets import PRESETS

PROMPT = PAGE_PROMPT
OTHER = "Qwen/Qwen2.5-0.5B-Instruct"  # on the allow-list, never loaded in these tests
DEFAULTS = page_defaults(max_new_tokens=4)


def inputs(**changes) -> list:
    return list({**DEFAULTS, **changes}.values())


def as_json(plot) -> dict:
    if isinstance(plot, PlotData):
        return json.loads(plot.plot)
    if isinstance(plot, dict):
        return json.loads(plot["plot"])
    return json.loads(plot.to_json())


class FakeEngine:
    num_layers = 4

    def __init__(self, name: str):
        self.name, self.warm_ups, self.compiled, self.warmed_prefills = name, 0, False, []

    def warm_up(self):
        self.warm_ups += 1

    def validate(self, length, settings):
        pass

    def compile_prefill(self, merges=True):
        self.compiled, self.compiled_merges = True, merges

    def warm_up_prefill(self, settings):
        self.warmed_prefills = list(settings)

    def uncompile_prefill(self):
        self.compiled = False


def recording_resident(fail: set[str] = frozenset(), fetch_fail: set[str] = frozenset(), free_first: bool = False):
    """A resident model whose loads are recorded (name, and whether the device lock was free), failing for names in
    `fail`."""
    calls = []

    def loader(name, progress):
        calls.append(name)
        if name in fail:
            raise OSError(f"We couldn't connect to 'https://huggingface.co' to load {name}. Check your connection.\n"
                          "See https://huggingface.co/docs for more.")
        return FakeEngine(name)

    def fetcher(name, progress):
        if name in fetch_fail:
            raise OSError(f"cannot reach the hub for {name}")

    return ResidentModel(loader, fetcher, free_first=free_first), calls


@pytest.fixture(scope="module")
def engine(app_engine):
    return app_engine  # here `engine` is the app's (conftest's default is a tiny model per family)


# --------------------------------------------------------------------------------------------------------------------
# The shared model: only the page's control switches it, and a failed switch keeps the old one
# --------------------------------------------------------------------------------------------------------------------


def test_model_switch_is_not_an_api_endpoint(client):
    endpoints = client.view_api(print_info=False, return_format="dict")["named_endpoints"]
    assert "/load_model" not in endpoints and {"/generate", "/plan"} <= set(endpoints)
    assert not [name for name in endpoints if name.startswith("/lambda")]  # no nameless endpoint either
    with pytest.raises(ValueError):
        client.predict(OTHER, 15, [], api_name="/load_model")


def test_model_switch_waits_in_the_device_queue(engine):
    """The switch shares the generations' concurrency group (one at a time), so it waits for a running one."""
    demo = layout.build_app(EMBEDDED, preload=False)
    fns = {getattr(fn.fn, "__name__", None): fn for fn in demo.fns.values()}
    switch, generate, plan = fns["load_model"], fns["generate"], fns["plan"]
    assert switch.api_visibility == "private"
    assert switch.concurrency_id == generate.concurrency_id and generate.concurrency_limit == 1
    assert not plan.preprocess and not generate.preprocess  # the callbacks check raw values themselves


def test_one_pick_in_the_model_menu_sends_one_switch(engine):
    """Gradio's Dropdown sends `input` when an option is picked and again on the blur that follows; `select` comes
    once per pick. With two requests, the second's "at most once every 30 s" replaced the first's real error."""
    demo = layout.build_app(EMBEDDED, preload=False)
    (menu,) = [b for b in demo.blocks.values() if getattr(b, "elem_id", None) == "model"]
    switches = [fn for fn in demo.fns.values() if getattr(fn.fn, "__name__", None) == "load_model"]
    assert [tuple(target) for fn in switches for target in fn.targets] == [(menu._id, "select")]


def test_asking_again_for_a_model_that_just_failed_repeats_why_it_failed():
    """A second request for a switch that has just failed (another page, a second click) gets that failure again,
    not "try again in N s" for something that will fail again."""
    resident, calls = recording_resident(fetch_fail={OTHER})
    resident.ensure(EMBEDDED)
    page = callbacks.Page()
    page.resident = resident
    first = list(page.load_model(OTHER, 15, []))[-1].status
    again = list(page.load_model(OTHER, 15, []))[-1].status
    assert "cannot reach the hub" in first and again == first, (first, again)
    assert resident.name == EMBEDDED and calls == [EMBEDDED]
    # Another model within the interval is still refused, with the interval's message.
    *_, (status, *_) = page.load_model("HuggingFaceTB/SmolLM2-360M-Instruct", 15, [])
    assert "switches at most once every" in status


def test_the_model_menu_admits_one_switch_per_interval():
    now = [1000.0]
    resident, calls = recording_resident()
    resident._clock, resident.switch_interval = lambda: now[0], 30
    resident.admit_switch(EMBEDDED)  # the first switch
    resident.ensure(EMBEDDED)
    resident.admit_switch(EMBEDDED)  # the model loaded already: nothing to load, always admitted
    now[0] += 10
    with pytest.raises(SwitchRefused, match=r"at most once every 30 s; try again in 20 s"):
        resident.admit_switch(OTHER)
    with pytest.raises(ValueError, match="not on the allow-list"):
        resident.admit_switch("someone/else")
    now[0] += 20
    resident.admit_switch(OTHER)  # the interval has passed
    # While one model loads, a switch to another is refused; one to the model loading follows it.
    release = threading.Event()
    resident._fetcher = lambda name, progress: release.wait(10)
    loading = threading.Thread(target=resident.ensure, args=(OTHER,))
    loading.start()
    try:
        while resident.busy_loading is None:
            release.wait(0.01)
        resident.admit_switch(OTHER)
        now[0] += 60
        with pytest.raises(SwitchRefused, match="is loading for another page"):
            resident.admit_switch(EMBEDDED)
    finally:
        release.set()
        loading.join(10)
    assert calls == [EMBEDDED, OTHER] and resident.name == OTHER


def test_a_refused_switch_keeps_the_model_and_says_when_to_try_again():
    resident, calls = recording_resident()
    resident.ensure(EMBEDDED)
    resident.admit_switch(OTHER)  # a switch just admitted: the next one has to wait
    page = callbacks.Page()
    page.resident = resident
    *_, (status, dropdown, cutoff, more) = page.load_model(OTHER, 15, [])
    assert status.startswith("**Could not load**") and "switches at most once every" in status
    assert dropdown["value"] == EMBEDDED and resident.name == EMBEDDED and calls == [EMBEDDED]


def test_a_raw_request_to_the_model_menu_is_refused(app_url, monkeypatch):
    """The menu's event is private, so no client library calls it, but a plain POST to the queue still reaches it:
    there the resident model's admission decides, and it starts no load."""
    monkeypatch.setattr(RESIDENT, "_switched_at", RESIDENT._clock())  # as if the menu had switched a moment ago
    # ... to the loaded model: a failed switch to OTHER left by an earlier test would be repeated as its reason.
    monkeypatch.setattr(RESIDENT, "_outcome", (RESIDENT.name, None))
    switch = page_event(app_url, "model", "select")
    *_, done = run_event(app_url, uuid.uuid4().hex, switch, [OTHER, 15, []])
    assert done["success"] and "switches at most once every" in done["output"]["data"][0], done
    *_, done = run_event(app_url, uuid.uuid4().hex, switch, ["someone/else", 15, []])
    assert not done["success"] and "not in the list of choices" in done["output"]["error"], done  # the menu's own check
    assert RESIDENT.busy_loading is None and RESIDENT.name == EMBEDDED


def test_no_route_skips_the_queue(app_url, monkeypatch):
    """Gradio's REST routes (/run/..., /api/...) call an event directly, outside the queue and its concurrency groups:
    a switch sent there started a load while a generation streamed, and a generation there ran beside another. Every
    queued event refuses them, so a switch or a generation waits in the device's queue whichever route it comes by."""
    monkeypatch.setattr(RESIDENT, "_switched_at", None)  # the switch would be admitted: only the route may refuse it
    monkeypatch.setattr(RESIDENT, "_fetcher", lambda name, progress: pytest.fail("a load started outside the queue"))
    switch = page_event(app_url, "model", "select")
    api = f"{app_url}gradio_api"
    for route in ("run", "api"):
        response = httpx.post(f"{api}/{route}/predict", timeout=60, json={
            "data": [OTHER, 15, []], "fn_index": switch["id"], "session_hash": uuid.uuid4().hex})
        assert response.status_code == 404 and "join the queue" in response.text, response.text
        response = httpx.post(f"{api}/{route}/generate", timeout=60, json={"data": inputs()})
        assert response.status_code == 404 and "join the queue" in response.text, response.text
    assert RESIDENT.busy_loading is None and RESIDENT.name == EMBEDDED


@pytest.mark.parametrize("callback", ["plan", "generate"])
def test_plan_and_generate_never_start_a_load(engine, callback):
    resident, calls = recording_resident()
    resident.install(EMBEDDED, engine)
    page = callbacks.Page()
    page.resident = resident
    with pytest.raises(gr.Error, match="is not loaded: the app serves .*Model menu"):
        list(getattr(page, callback)(*inputs(model=OTHER)))
    assert calls == [] and resident.busy_loading is None and resident.name == EMBEDDED
    pairing, lengths, status = page.preview(*inputs(model=OTHER))
    assert calls == [] and "once the model is loaded" in status


def test_a_failed_switch_keeps_the_previous_model_and_says_why():
    resident, calls = recording_resident(fail={OTHER})
    resident.ensure(EMBEDDED)
    previous = resident.engine
    page = callbacks.Page()
    page.resident = resident
    *_, (status, dropdown, cutoff, more) = page.load_model(OTHER, 15, [])
    assert resident.name == EMBEDDED and resident.engine is previous
    assert dropdown["value"] == EMBEDDED  # the menu goes back to the model still serving
    assert status.startswith("**Could not load**") and "couldn't connect" in status and "Still serving" in status
    assert "\n" not in status and "docs" not in status  # one line: the first sentence of the hub's paragraph
    # A later run uses the model still loaded, without trying the failed one again.
    assert list(resident.following(EMBEDDED)) == [] and calls == [EMBEDDED, OTHER]


def test_a_switch_that_cannot_fetch_never_frees_the_resident_model():
    resident, calls = recording_resident(fetch_fail={OTHER}, free_first=True)
    resident.ensure(EMBEDDED)
    previous = resident.engine
    with pytest.raises(OSError, match="cannot reach the hub"):
        resident.ensure(OTHER)
    assert resident.engine is previous and calls == [EMBEDDED]


def test_a_switch_that_fails_after_freeing_loads_the_previous_model_back():
    resident, calls = recording_resident(fail={OTHER}, free_first=True)
    resident.ensure(EMBEDDED)
    with pytest.raises(OSError):
        resident.ensure(OTHER)
    assert resident.name == EMBEDDED and resident.engine is not None and calls == [EMBEDDED, OTHER, EMBEDDED]


def test_freeing_the_resident_model_waits_for_the_step_on_the_device():
    resident, calls = recording_resident(free_first=True)
    resident.ensure(EMBEDDED)
    previous = resident.engine
    seen_during_step = []
    fetched = threading.Event()
    resident._fetcher = lambda name, progress: fetched.set()
    with resident.device_lock:  # a generation step is running
        switching = threading.Thread(target=resident.ensure, args=(OTHER,))
        switching.start()
        assert fetched.wait(10)
        switching.join(0.5)  # time for a switch that ignored the lock to free the model
        seen_during_step.append(resident.engine)
    switching.join(10)
    assert seen_during_step == [previous] and resident.name == OTHER


def test_every_load_is_warmed_up_before_it_serves():
    resident, _ = recording_resident()
    engine = resident.ensure(EMBEDDED)
    assert engine.warm_ups == 1 and not engine.compiled  # the prompt's layers stay eager unless asked


def test_a_compiled_prefill_is_compiled_for_base_and_every_preset_before_it_serves(monkeypatch):
    monkeypatch.setenv("SLERPVIZ_PREFILL", "compiled")
    resident, _ = recording_resident()
    engine = resident.ensure(EMBEDDED)
    assert engine.compiled and not engine.compiled_merges  # a merge would compile for each new setting
    assert len(engine.warmed_prefills) == 2 + len(PRESETS)
    assert engine.warmed_prefills[0].cutoffs == ()  # base
    assert engine.warmed_prefills[-1].proportional  # its float mask is another kind of layer call


def test_a_prefill_that_cannot_compile_is_served_eagerly(monkeypatch):
    def no_compiler(self, settings):
        raise RuntimeError("InvalidCxxCompiler: No working C++ compiler found")

    monkeypatch.setenv("SLERPVIZ_PREFILL", "compiled")
    monkeypatch.setattr(FakeEngine, "warm_up_prefill", no_compiler)
    resident, _ = recording_resident()
    engine = resident.ensure(EMBEDDED)
    assert resident.engine is engine and engine.warm_ups == 1 and not engine.compiled


def test_a_compiled_prefill_is_not_asked_of_a_zero_gpu_worker(monkeypatch):
    monkeypatch.setenv("SLERPVIZ_PREFILL", "compiled")
    monkeypatch.setenv("SPACES_ZERO_GPU", "true")
    assert resident_module.chosen_prefill() == "eager"


def test_an_unknown_prefill_path_fails_the_load_and_says_what_is_allowed(monkeypatch):
    monkeypatch.setenv("SLERPVIZ_PREFILL", "fused")
    resident, _ = recording_resident()
    with pytest.raises(ValueError, match=r"\$SLERPVIZ_PREFILL: unknown prefill 'fused'; choose one of eager, compiled"):
        resident.ensure(EMBEDDED)
    assert resident.engine is None


# --------------------------------------------------------------------------------------------------------------------
# Bad values, as any client may send them
# --------------------------------------------------------------------------------------------------------------------

BAD_VALUES = [
    (dict(cutoff="abc"), r"cutoff must be a whole number, 0 or more \(got 'abc'\)"),
    (dict(cutoff=None), r"cutoff must be a whole number, 0 or more \(got None\)"),
    (dict(cutoff=3.5), r"cutoff must be a whole number, 0 or more \(got 3.5\)"),
    (dict(more_cutoffs=["x"]), r"further cutoff must be a whole number"),
    (dict(max_new_tokens="ten"), r"max new tokens must be a whole number from 1 to 512 \(got 'ten'\)"),
    (dict(temperature="hot"), r"temperature must be a number from 0 to 2 \(got 'hot'\)"),
    (dict(temperature=math.nan), r"temperature must be a number from 0 to 2 \(got nan\)"),
    (dict(ratio="abc"), r"merge ratio must be a number from 0 to 1 \(got 'abc'\)"),
    (dict(seed=math.nan), r"seed must be a whole number from 0 to 9223372036854775807 \(got nan\)"),
    (dict(seed=math.inf), r"seed must be a whole number from 0 to 9223372036854775807 \(got inf\)"),
    (dict(seed=2**70), r"seed must be a whole number from 0 to 9223372036854775807"),
    (dict(seed=1.5), r"seed must be a whole number from 0 to 9223372036854775807 \(got 1.5\)"),
    (dict(seed=-1), r"seed must be a whole number from 0 to 9223372036854775807 \(got -1\)"),
    (dict(keep_start=2.5), r"keep start must be a whole number, 0 or more \(got 2.5\)"),
    (dict(chat="no"), r"chat must be true or false \(got 'no'\)"),
    (dict(proportional=1), r"proportional attention must be true or false \(got 1\)"),
    (dict(method=["slerp"]), r"unknown merge method \['slerp'\]; choose one of"),
    (dict(prompt="hello \ud800 there"), r"the prompt holds a lone surrogate .* not valid Unicode text"),
    (dict(prompt=42), r"the prompt must be text \(got 42\)"),
]


@pytest.mark.parametrize("changes, message", BAD_VALUES)
def test_bad_values_are_refused_field_by_field(changes, message):
    with pytest.raises(ValueError, match=message):
        form.parse_request(*inputs(**changes))


@pytest.mark.parametrize("changes, message", BAD_VALUES)
def test_bad_values_are_refused_before_any_model_work(page, monkeypatch, changes, message):
    monkeypatch.setattr(RESIDENT, "following", lambda name: pytest.fail("model work before the inputs were checked"))
    for callback in (page.plan, page.generate):
        with pytest.raises(gr.Error, match=message):
            list(callback(*inputs(**changes)))


# The attention choice's numbers and the per-cutoff ratios, checked like every other field.
MERGE_VALUES = [
    (dict(attention_window=0), r"attention window must be a whole number, 1 or more \(got 0\)"),
    (dict(attention_window=2.5), r"attention window must be a whole number, 1 or more \(got 2.5\)"),
    (dict(attention_window=None), r"attention window must be a whole number, 1 or more \(got None\)"),
    (dict(attention_keep=-1), r"attention keep must be a whole number, 0 or more \(got -1\)"),
    (dict(attention_keep="many"), r"attention keep must be a whole number, 0 or more \(got 'many'\)"),
    (dict(attention_reach=-1), r"attention reach must be a whole number from 0 to 256 \(got -1\)"),
    (dict(attention_reach="far"), r"attention reach must be a whole number from 0 to 256 \(got 'far'\)"),
    (dict(attention_keep_share=1.5), r"attention keep share must be a number from 0 to 1 \(got 1.5\)"),
    (dict(attention_keep_share="half"), r"attention keep share must be a number from 0 to 1 \(got 'half'\)"),
    (dict(ratios="0.5, x"), r"ratio per cutoff must be a number from 0 to 1 \(got ' x'\)"),
    (dict(ratios=[1.5]), r"ratio per cutoff must be a number from 0 to 1 \(got 1.5\)"),
    (dict(ratios="0.5, 1"), r"ratio per cutoff: 2 ratios for 1 cutoffs \(15\): give one per cutoff, in the cutoffs' "
                            r"order, or one for all"),
    (dict(ratios="0.5/1"), r"ratio per cutoff: separate the ratios with commas, like 0.5,1 \(got '0.5/1'\)"),
]


@pytest.mark.parametrize("changes, message", MERGE_VALUES)
def test_merge_values_are_refused_field_by_field_before_any_model_work(page, monkeypatch, changes, message):
    with pytest.raises(ValueError, match=message):
        form.parse_request(*inputs(**changes))
    monkeypatch.setattr(RESIDENT, "following", lambda name: pytest.fail("model work before the inputs were checked"))
    for callback in (page.plan, page.generate):
        with pytest.raises(gr.Error, match=message):
            list(callback(*inputs(**changes)))


def test_the_attention_numbers_arrive_through_the_api_in_their_place(app_url, client):
    kind, payload = raw_call(app_url, "plan", inputs(choice="attention", attention_window=0))
    assert kind == "error" and re.search(MERGE_VALUES[0][1], payload["error"]), payload
    kind, payload = raw_call(app_url, "plan", inputs(choice="attention", attention_window=4, attention_keep=1))
    assert kind == "complete" and "*attention* choice" in payload[2], payload
    kind, payload = raw_call(app_url, "plan", inputs(choice="attention", attention_keep_share=1.5))
    assert kind == "error" and "attention keep share must be" in payload["error"], payload
    # A client-library call written before these inputs existed sends fewer values: the rest take their defaults.
    pairing, lengths, status = client.predict(*inputs(cutoff=10)[:16], api_name="/plan")
    assert "after layer 10" in status


def raw_call(app_url: str, endpoint: str, data: list) -> tuple[str, dict | list]:
    """One call as any HTTP client may make it (NaN and Infinity included, which gradio_client will not send):
    the event's kind ("error" or "complete") and its payload."""
    url = f"{app_url}gradio_api/call/{endpoint}"
    body = json.dumps({"data": data})  # allow_nan: NaN and Infinity go out as JSON literals
    event_id = httpx.post(url, content=body, headers={"content-type": "application/json"}, timeout=60).json()[
        "event_id"]
    kind = None
    with httpx.stream("GET", f"{url}/{event_id}", timeout=120) as stream:
        for line in stream.iter_lines():
            if line.startswith("event: "):
                kind = line.removeprefix("event: ")
            elif line.startswith("data: ") and kind in ("error", "complete"):
                return kind, json.loads(line.removeprefix("data: "))
    raise AssertionError("the stream ended without a result")


@pytest.mark.parametrize("changes, message", [case for case in BAD_VALUES if "proportional" not in case[0]])
def test_bad_values_through_the_api_get_one_line_naming_the_field(app_url, changes, message):
    for endpoint in ("plan", "generate"):
        kind, payload = raw_call(app_url, endpoint, inputs(**changes))
        assert kind == "error" and payload["error"] is not None, payload
        assert re.search(message, payload["error"]) and "\n" not in payload["error"]


def test_the_client_library_gets_the_message_too(client):
    for endpoint in ("/plan", "/generate"):
        with pytest.raises(AppError, match=r"max new tokens must be a whole number from 1 to 512 \(got 'ten'\)"):
            client.predict(*inputs(max_new_tokens="ten"), api_name=endpoint)


def test_whole_numbers_sent_as_floats_or_text_are_taken_as_they_are():
    request = form.parse_request(*inputs(cutoff=15.0, more_cutoffs=["20", 25.0], keep_start="3", seed=2**63 - 1,
                                       max_new_tokens=512.0))
    assert request.settings.cutoffs == (15, 20, 25) and request.settings.keep_start == 3
    assert request.sampling.seed == 2**63 - 1 and request.sampling.max_new_tokens == 512


# --------------------------------------------------------------------------------------------------------------------
# Uploads, API names
# --------------------------------------------------------------------------------------------------------------------


def test_uploads_are_refused_before_a_byte_is_written(app_url):
    """The page takes no files, so Gradio's upload route is refused outright: 20 requests of 1,000 files x 1 KB once
    wrote 162 MB into its upload folder, each file a few kilobytes on disk."""
    from gradio.utils import get_upload_folder

    names = [f"slerpviz-upload-{uuid.uuid4().hex}.txt" for _ in range(50)]
    for route in ("gradio_api/upload", "gradio_api/upload/"):
        response = httpx.post(f"{app_url}{route}", files=[("files", (name, b"x" * 500)) for name in names], timeout=60)
        assert response.status_code == 403 and "takes no files" in response.text, (response.status_code, response.text)
    written = [path.name for path in Path(get_upload_folder()).rglob("slerpviz-upload-*.txt") if path.name in names]
    assert written == []


def test_uploads_never_reach_a_static_file_worker(monkeypatch):
    """Gradio's static file workers ($GRADIO_NUM_WORKERS) take uploads in processes of their own, which the refusal
    does not guard: the app launches none, and its refusal is on the app it launches."""
    launched = {}
    monkeypatch.setenv("GRADIO_NUM_WORKERS", "2")
    monkeypatch.setattr(gr.Blocks, "launch", lambda demo, **options: launched.update(options))
    layout.serve(gr.Blocks(), app_kwargs={"docs_url": None})
    assert launched["num_workers"] == 0 and launched["app_kwargs"]["docs_url"] is None
    assert [m.cls for m in launched["app_kwargs"]["middleware"]] == [admission.RefuseUploads]


def test_api_outputs_have_names(client):
    endpoints = client.view_api(print_info=False, return_format="dict")["named_endpoints"]
    for endpoint in ("/generate", "/plan"):
        names = [item["label"] for item in endpoints[endpoint]["returns"]]
        assert names and all(name and not name.startswith("value_") for name in names), names
    assert [item["label"] for item in endpoints["/plan"]["returns"]] == [
        "Token pairing", "Sequence length and attention cost per layer", "Status"]


# --------------------------------------------------------------------------------------------------------------------
# Stop finalises every panel; the page greets instead of complaining
# --------------------------------------------------------------------------------------------------------------------


def test_stop_finalises_every_panel(page):
    view = callbacks.PageView()
    stream = page.generate(*inputs(max_new_tokens=40), view=view)
    for output in stream:
        if isinstance(output[9], str) and output[9].startswith("**Generating") and len(view.merged.generated_ids) >= 3:
            break
    stream.close()
    base_stats, merged_stats, comparison, latency, kv, status = page.stopped(view)
    reached = max(len(view.base.generated_ids), len(view.merged.generated_ids))
    assert 3 <= reached < 40
    assert f"**Stopped at token {reached}**" in comparison and "agree position by position" in comparison
    assert "appears when both" not in comparison
    assert "· stopped" in base_stats and "· stopped" in merged_stats
    assert status.startswith(f"**Stopped** at token {reached}")
    latency_points = [len(trace.y) for trace in latency.data]
    assert latency_points == [len(view.base.generated_ids), len(view.merged.generated_ids)]
    assert [sum(trace.y) * 1024 for trace in kv.data] == pytest.approx(
        [sum(view.base.kv_bytes_per_layer), sum(view.merged.kv_bytes_per_layer)])


def test_stop_after_the_end_leaves_done_alone(page):
    view = callbacks.PageView()
    *_, last = page.generate(*inputs(max_new_tokens=2), view=view)
    assert last[9].startswith("**Done**")
    assert all(output == gr.skip() for output in page.stopped(view))
    assert page.stopped(callbacks.PageView())[-1].startswith("**Stopped**: nothing was generating")
    prefilling = callbacks.PageView(sampling=Sampling(max_new_tokens=4))  # Run pressed, no token yet
    *_, comparison, latency, kv, status = page.stopped(prefilling)
    assert "Stopped at token 0" in comparison and status.startswith("**Stopped** during the prefill")


def test_stop_during_a_long_prefill_ends_it_at_the_next_layer(page, engine):
    # A prefill of thousands of tokens runs for minutes on a CPU; Stop ends it between two layers instead.
    layers_run = []
    hooks = [layer.register_forward_hook(lambda *_: layers_run.append(1)) for layer in engine.decoder.layers]
    view = callbacks.PageView()
    stream = page.generate(*inputs(prompt="word " * 1500, max_new_tokens=4), view=view)
    try:
        next(stream)  # the plan: the prefill starts at the next message
        layers_run.clear()
        stopper = threading.Timer(callbacks.SETTLE_S + 0.2, page.stopped, args=(view,))  # after the pause
        stopper.start()
        assert list(stream) == []  # the stream ends without a step, and without an error
        stopper.join()
    finally:
        for hook in hooks:
            hook.remove()
    assert view.stop.is_set() and view.base is None
    assert len(layers_run) < 2 * engine.num_layers  # base and merged prefills did not both run through
    assert page.resident.device_lock.acquire(timeout=1)
    page.resident.device_lock.release()


def test_stop_while_the_page_settles_runs_no_layer(page, engine, monkeypatch):
    monkeypatch.setattr(callbacks, "SETTLE_S", 1.0)
    layers_run = []
    hooks = [layer.register_forward_hook(lambda *_: layers_run.append(1)) for layer in engine.decoder.layers]
    view = callbacks.PageView()
    stream = page.generate(*inputs(max_new_tokens=4), view=view)
    try:
        next(stream)  # the message the page draws during the pause
        stopper = threading.Timer(0.2, page.stopped, args=(view,))
        stopper.start()
        assert list(stream) == []
        stopper.join()
    finally:
        for hook in hooks:
            hook.remove()
    assert view.stop.is_set() and view.base is None and len(layers_run) <= 1


def test_an_empty_prompt_gets_a_greeting_not_a_complaint(page):
    pairing, lengths, status = page.preview(*inputs(prompt=""))
    assert "Cannot plan" not in status and "Type a prompt" in status and status.startswith("**Ready**")


def test_panel_and_plot_word_the_kv_saving_alike(page):
    *_, last = page.generate(*inputs(max_new_tokens=3))
    merged_stats, kv = last[3], as_json(last[8])
    saving = re.search(r"\d+% smaller than base", merged_stats).group(0)
    assert saving in kv["layout"]["title"]["text"]


# --------------------------------------------------------------------------------------------------------------------
# Long prompts: the pairing plot is light and crosses the stream once
# --------------------------------------------------------------------------------------------------------------------


def test_generate_sends_the_pairing_plot_once_per_run(page, monkeypatch):
    released = []
    monkeypatch.setattr(callbacks, "release_memory", lambda: released.append(True))
    monkeypatch.setattr(callbacks, "SHOW_EVERY_S", 0.0)  # a message every step: the figure must still go once
    outputs = list(page.generate(*inputs(prompt="word " * 40, chat=False, max_new_tokens=9)))
    pairings = [o[5] for o in outputs if isinstance(o[5], PlotData)]
    assert len({id(p) for p in pairings}) == 1  # one figure, serialised once, yielded as is after that
    assert isinstance(outputs[-1][5], PlotData)  # and still in the last message, for API clients
    assert released == [True]  # memory handed back once the run is over


# What the page's Run sends, read off the wire: the events the Run button starts, joined through the queue and read
# from the session's stream, as the page does. Gradio ends a stream with a message holding its last values whole.


def page_event(app_url: str, elem_id: str, trigger: str) -> dict:
    """The page's event that `trigger` on the component `elem_id` starts, from the config the page loads."""
    config = httpx.get(f"{app_url}config", timeout=60).json()
    (component,) = [c["id"] for c in config["components"] if c["props"].get("elem_id") == elem_id]
    return next(d for d in config["dependencies"] if [component, trigger] in d["targets"])


def run_event(app_url: str, session: str, event: dict, data: list) -> list[dict]:
    """One event as the page sends it: join the queue, then read the session's stream until the event completes;
    the messages it got, the last one saying whether it succeeded."""
    api = f"{app_url}gradio_api"
    joined = httpx.post(f"{api}/queue/join", timeout=60, json={
        "data": data, "fn_index": event["id"], "session_hash": session, "event_data": None, "trigger_id": None})
    joined.raise_for_status()
    event_id, messages = joined.json()["event_id"], []
    with httpx.stream("GET", f"{api}/queue/data", params={"session_hash": session}, timeout=300) as stream:
        for line in stream.iter_lines():
            message = json.loads(line.removeprefix("data:")) if line.startswith("data:") else {}
            if message.get("event_id") == event_id:
                messages.append(message)
                if message["msg"] == "process_completed":
                    return messages
    raise AssertionError(f"the stream ended before the event did: {messages}")


def join_queue(app_url: str, session: str, event: dict, data: list) -> httpx.Response:
    """Join the queue for one event, as the page does, without reading its stream."""
    return httpx.post(f"{app_url}gradio_api/queue/join", timeout=60, json={
        "data": data, "fn_index": event["id"], "session_hash": session, "event_data": None, "trigger_id": None})


def read_until_done(app_url: str, session: str, event_ids: list[str]) -> None:
    """Read a session's stream until each of `event_ids` has completed."""
    pending = set(event_ids)
    with httpx.stream("GET", f"{app_url}gradio_api/queue/data", params={"session_hash": session},
                      timeout=300) as stream:
        for line in stream.iter_lines():
            message = json.loads(line.removeprefix("data:")) if line.startswith("data:") else {}
            if message.get("msg") == "process_completed":
                pending.discard(message.get("event_id"))
                if not pending:
                    return
    raise AssertionError(f"the stream ended before these events did: {pending}")


def test_one_client_cannot_fill_the_queue(app_url, monkeypatch):
    """65 raw joins from one process were all accepted in under a second, and every later client waited behind them.
    Now a page (session) holds at most PER_SESSION waiting jobs and an address PER_ADDRESS, and is told why when it
    asks for more; a job that ends frees its place."""
    started, release = threading.Event(), threading.Event()

    def held(request, stop=None):  # the device stays busy with this generation until released
        started.set()
        release.wait(120)
        return
        yield

    monkeypatch.setattr(callbacks, "generation_traces", held)
    monkeypatch.setattr(callbacks, "release_memory", lambda: None)  # a full garbage collection per job is slow here
    config = httpx.get(f"{app_url}config", timeout=60).json()
    generate = next(d for d in config["dependencies"] if d["api_name"] == "generate")
    data = [*inputs(), None]
    joined: dict[str, list[str]] = {}

    def join(session: str) -> httpx.Response:
        response = join_queue(app_url, session, generate, data)
        if response.status_code == 200:
            joined.setdefault(session, []).append(response.json()["event_id"])
        return response

    try:
        assert join(uuid.uuid4().hex).status_code == 200
        assert started.wait(60)  # it runs on the device: every generation joined from now on waits
        page = uuid.uuid4().hex
        assert [join(page).status_code for _ in range(admission.PER_SESSION)] == [200] * admission.PER_SESSION
        refused = join(page)
        assert refused.status_code == 400, refused.text
        assert refused.json()["detail"] == (f"This page has {admission.PER_SESSION} jobs waiting in the queue already "
                                            f"(at most {admission.PER_SESSION} a page): wait for one to finish.")
        # Other pages from this address get in until the address holds its share of the queue, and no further.
        others = admission.PER_ADDRESS - admission.PER_SESSION
        assert [join(uuid.uuid4().hex).status_code for _ in range(others)] == [200] * others
        refused = join(uuid.uuid4().hex)
        assert refused.status_code == 400 and f"(at most {admission.PER_ADDRESS} an address)" in refused.text
    finally:
        release.set()
        for session, event_ids in joined.items():
            read_until_done(app_url, session, event_ids)
    # Their jobs done, the page and the address get in again.
    again = join(page)
    assert again.status_code == 200, again.text
    read_until_done(app_url, page, joined[page][-1:])


def test_the_queue_shares_are_set_from_the_environment_and_the_address_share_is_off_behind_a_proxy(monkeypatch):
    for variable in ("SLERPVIZ_QUEUE_PER_SESSION", "SLERPVIZ_QUEUE_PER_ADDRESS"):
        monkeypatch.delenv(variable, raising=False)
    assert admission.ClientLimit.from_environment() == admission.ClientLimit(4, 16)
    assert admission.ClientLimit.from_environment(behind_proxy=True) == admission.ClientLimit(4, None)
    monkeypatch.setenv("SLERPVIZ_QUEUE_PER_SESSION", "2")
    monkeypatch.setenv("SLERPVIZ_QUEUE_PER_ADDRESS", "0")  # 0: no limit
    limit = admission.ClientLimit.from_environment()
    assert limit == admission.ClientLimit(2, None)
    waiting = [("page", "10.0.0.1")] * 2 + [("other", "10.0.0.1")] * 50
    assert "at most 2 a page" in limit.refusal(waiting, "page", "10.0.0.1")
    assert limit.refusal(waiting, "new", "10.0.0.1") is None
    one = admission.ClientLimit(1, None).refusal([("page", None)], "page", None)
    assert one.startswith("This page has 1 job waiting")
    monkeypatch.setenv("SLERPVIZ_QUEUE_PER_ADDRESS", "-1")
    with pytest.raises(ValueError, match="SLERPVIZ_QUEUE_PER_ADDRESS must be 0"):
        admission.ClientLimit.from_environment()


def holds_figure(value) -> bool:
    """Whether a message's value for an output (whole, or the edits of a diff) carries a Plotly figure."""
    if isinstance(value, str):
        return value.startswith('{"data"')
    values = value.values() if isinstance(value, dict) else value if isinstance(value, list) else ()
    return any(holds_figure(item) for item in values)


def pairing_figures(app_url: str, messages: list[dict], event: dict) -> list[str]:
    """Each pairing figure the messages carried, as sent (a diff's edits, or the whole value)."""
    config = httpx.get(f"{app_url}config", timeout=60).json()
    (pairing,) = [c["id"] for c in config["components"] if c["props"].get("elem_id") == "pairing-plot"]
    index = event["outputs"].index(pairing)
    values = [m["output"]["data"][index] for m in messages if m.get("output", {}).get("data")]
    return [json.dumps(value) for value in values if holds_figure(value)]


@pytest.fixture(scope="module")
def run_button(app_url):
    """The Run button's two events (the plan, then on its success the generation) and the prompt's preview."""
    config = httpx.get(f"{app_url}config", timeout=60).json()
    plan = page_event(app_url, "run", "click")
    generate = next(d for d in config["dependencies"] if d["trigger_after"] == plan["id"])
    assert generate["trigger_only_on_success"]
    return plan, generate, page_event(app_url, "prompt", "blur")


def press_run(app_url: str, run_button, session: str, data: list) -> tuple[list[str], list[str]]:
    """Run, as the page presses it: the pairing figures the plan sent, and those the generation sent."""
    plan, generate, _ = run_button
    sent = []
    for event in (plan, generate):
        messages = run_event(app_url, session, event, data)
        assert messages[-1]["success"], messages[-1]
        sent.append(pairing_figures(app_url, messages, event))
    return sent[0], sent[1]


LONG_ENOUGH = dict(prompt="word " * 40, chat=False, max_new_tokens=9)


def test_stop_cancels_the_plan_too_so_no_generation_starts_after_it(app_url, run_button):
    plan, generate, _ = run_button
    config = httpx.get(f"{app_url}config", timeout=60).json()
    (stop,) = [c["id"] for c in config["components"] if c["props"].get("elem_id") == "stop"]
    cancelled = {event for d in config["dependencies"] if [stop, "click"] in d["targets"] for event in d["cancels"]}
    assert {plan["id"], generate["id"]} <= cancelled


def test_run_sends_the_pairing_plot_once_where_the_page_shows_the_plan(app_url, run_button):
    session, data = uuid.uuid4().hex, [*inputs(**LONG_ENOUGH), None]  # None: the page's view, kept by the server
    *_, preview = run_button
    plan_shown = pairing_figures(app_url, run_event(app_url, session, preview, data), preview)
    assert len(plan_shown) == 1  # leaving the prompt box previews the plan
    from_plan, from_generation = press_run(app_url, run_button, session, data)
    assert from_plan == [] and len(from_generation) == 1  # once, when the prompt has run: with the pair cosines
    assert "pair cosine: known once" in plan_shown[0] and "pair cosine: known once" not in from_generation[0]
    assert press_run(app_url, run_button, session, data) == ([], [])  # the same run again: the page shows it all


@pytest.mark.parametrize("choice", ["consecutive", "uniform", "similar", "attention"])
def test_run_on_a_fresh_page_sends_each_pairing_picture_once(app_url, run_button, choice):
    """No preview before: the plan's picture (a placeholder where the plan is made at the cutoff), then the one drawn
    once the prompt has run; each once, never again in a stream's last message, and nothing on a second Run."""
    session = uuid.uuid4().hex
    data = [*inputs(**LONG_ENOUGH, choice=choice, ratio=0.5, attention_window=4), None]
    from_plan, from_generation = press_run(app_url, run_button, session, data)
    assert len(from_plan) == 1 and len(from_generation) == 1
    pending = "the pairing appears once the prompt has run" in from_plan[0]
    assert pending == (choice in ("similar", "attention"))
    assert press_run(app_url, run_button, session, data) == ([], [])


def test_the_api_still_ends_with_every_view(app_url):
    """/generate, for API clients, keeps the pairing plot in its last message (the page's Run does not use it)."""
    config = httpx.get(f"{app_url}config", timeout=60).json()
    generate = next(d for d in config["dependencies"] if d["api_name"] == "generate")
    assert generate["targets"] == []
    messages = run_event(app_url, uuid.uuid4().hex, generate, [*inputs(**LONG_ENOUGH), None])
    assert messages[-1]["success"] and len(pairing_figures(app_url, messages[-1:], generate)) == 1


def test_the_pairing_labels_can_move_along_a_long_prompt(page):
    view = callbacks.PageView()
    *_, (pairing, lengths, status) = page.plan(*inputs(prompt="word " * 800, chat=False), view=view)
    first = next(t for t in pairing.data if t.name == "prompt tokens")
    assert first.x[0] == 0
    moved = page.pairing_window(400, view)
    labelled = next(t for t in moved.data if t.name == "prompt tokens")
    assert labelled.x[0] == 400 and moved.layout.xaxis.range[0] == 399
    # The next plan of this page keeps the place.
    *_, (again, _, _) = page.plan(*inputs(prompt="word " * 800, chat=False, cutoff=10), view=view)
    assert next(t for t in again.data if t.name == "prompt tokens").x[0] == 400
    with pytest.raises(gr.Error, match="labels from token must be a whole number"):
        page.pairing_window(-1, view)


def test_a_slow_switch_does_not_stop_requests_for_the_model_still_resident():
    # On a CPU (nothing to free first) the resident model keeps serving while another one loads, however long the
    # load takes; where the switch frees the GPU first, requests wait for the new model.
    release = threading.Event()
    for free_first, waits in ((False, False), (True, True)):
        resident, _ = recording_resident(free_first=free_first)
        resident.ensure(EMBEDDED)
        resident._fetcher = lambda name, progress: release.wait(30)  # a hub that never answers
        release.clear()
        switching = threading.Thread(target=resident.ensure, args=(OTHER,))
        switching.start()
        try:
            following = resident.following(EMBEDDED, poll=0.01)
            assert (next(following, None) is not None) == waits  # a progress line means it waits
        finally:
            release.set()
            switching.join(10)


def test_a_prompt_too_long_to_fit_is_refused_before_it_is_tokenised(engine):
    context = engine.config.max_position_embeddings
    calls = []
    original = engine.tokenizer.__class__.__call__
    try:
        engine.tokenizer.__class__.__call__ = lambda *a, **k: calls.append(1) or original(*a, **k)
        with pytest.raises(ValueError, match=f"more than could fit the model's context of {context:,} tokens"):
            engine.encode("a" * (64 * context + 1), chat=False)
    finally:
        engine.tokenizer.__class__.__call__ = original
    assert calls == []
