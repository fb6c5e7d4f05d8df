"""The Gradio page: base and merged generations streamed side by side, with the Plotly views.

The page only lays out and wires. Its form is `slerpviz.app.form.Form`: one control per field, handed to /plan,
/generate and the preview by field name, in the order the form lists them (the API's order). What the callbacks
(`slerpviz.callbacks.Page`) return is named by their output tuples, whose field names are the names the layout
gives its components here. The engine runs the two generations, `slerpviz.app.panels` writes the text and
`slerpviz.app.plots` and `slerpviz.app.pairing` draw the pictures. `build_app` puts the page together from small
functions, one for each part of it (the controls, the outputs) and one for each group of events.

One model lives on the device at a time (`slerpviz.app.resident.RESIDENT`); generations and model swaps queue for it one
at a time, and a bounded queue tells everyone else their place in line.
"""

from __future__ import annotations

import os

import gradio as gr
from gradio.utils import get_space
from starlette.middleware import Middleware

from . import pairing_data
from .admission import ClientLimit, RefuseUploads, limit_queue_per_client
from .callbacks import OPENING_PRESET, ModelControls, OpeningControls, Page, PageView, Panels, PlanViews, StoppedPanels
from ..engine import MODES, MergeSettings
from .form import EXAMPLE_FIELDS, FIELDS, MAX_NEW_TOKENS, MAX_TEMPERATURE, MERGE_FIELDS
from .resident import RESIDENT, default_model, on_zero_gpu
from ..merge import CHOICES, METHODS, POSITION_MODES
from ..models import ALLOWED_MODELS, check_allowed
from .panels import preset_details, preset_note
from ..presets import PRESETS

QUEUE_SIZE = 64  # bounded: twenty users at once all get a place in line, a flood gets "queue full"

INTRO = """
# slerpviz · token merging with SLERP, live
At the **cutoff** layer, the hidden states of neighbouring prompt tokens are paired and each pair is replaced by its
SLERP, so every later layer runs on a sequence about half as long. The **base** model (left) and the **merged** one
(right) generate at the same time, step by step; each is timed on its own steps only.
"""

NOTES = """
**SLERP vs LERP at t = 0.5.** SLERP of two vectors at t = 0.5 points in exactly the same direction as their mean
(LERP); it only rescales it, by 1 / cos(θ/2) where θ is the angle between them. So the two methods differ only in
the norm of the merged state. **slerp-dir** keeps SLERP's direction with the average of the two norms, so it undoes
that inflation. **seed-2024** reproduces the April 2024 article's code, which normalised whole tensors
instead of single vectors: θ comes out near 90° for every pair and the result is about (a + b)/√2. **drop** is the
control: it keeps each pair's first token and discards the second, as token pruning does, so you can see what
merging buys over dropping the same tokens (with positions *first*, the kept token sits where it was).

**Positions.** *mean*: a slot sits at the mean position of its tokens; *first*: at its first token's; *renumber*:
slots are renumbered 0, 1, 2, … (the article). **Modes.** *cached*: the prompt is merged once at prefill and later
tokens decode against a KV cache per layer (shorter after the cutoff). *recompute*: no cache; every step re-runs and
re-merges the whole sequence (the article's semantics, slower).

**More merge settings.** *Merge ratio* merges only that share of the eligible pairs (*ratio per cutoff* gives one
for each cutoff); *pair choice* picks them: the first ones (*consecutive*), spread evenly (*uniform*), the most
similar neighbours at the cutoff (*similar*), or the pairs the prompt attends to least (*attention*: each token is
scored by the attention the last *W* prompt tokens pay it at the cutoff layer, the *keep most attended* budget never
merges (on a long prompt it grows to the *kept share* of its tokens, when that is more), and with a *reach* a pair
ranks with the most attended token within that many tokens either side, so the words around what the prompt looks
at stay unmerged with it). *similar* and *attention* are planned from the hidden
states during the prefill, so their pairing plot appears once the prompt has run; with *attention* the prompt tokens
are then coloured by the attention they received. A prompt holding a pass key ("The pass key is 71152 …") gets it
marked in the pairing plot, and the comparison says whether each side answered it.
*Proportional attention* raises each merged key's attention logit by log(tokens it holds), so a slot standing for two
tokens draws about as much attention as the two did.

**Protected spans.** keep-start / keep-end tokens are never merged (for example the chat template's system header);
the first and last prompt tokens always stay alone. **Timing.** Time to first token includes the prefill; tokens per
second is one over the median decode step; on a GPU each step is synchronised before its clock stops. Each side is
timed on its own steps, and a coin decides each round which side steps first, so the page's own work between steps
(this page being drawn, on a laptop on the same processor) falls on either side by chance. On a short prompt one
run's times to first token can still differ by up to two fifths with the same work on both sides: press Run again
before reading much into a small gap.
"""

CSS = """
.panel-base h3 { color: #4C78A8; }
.panel-merged h3 { color: #F58518; }
.generation textarea { font-size: 0.95rem; line-height: 1.45; }
/* A slider's track keeps a 112px minimum width, so in a narrow column it pushes the maximum's label ("512") out of
   its box, clipped to "51"; letting the track shrink keeps every label whole. */
.slider_input_container input[type=range] { min-width: 0; }
"""


# The page's components, by name: the form's fields and the callbacks' outputs by the names the form and the output
# tuples give them, and the page's own controls (buttons, the examples, the preset menu) by names of their own.
Named = dict[str, gr.components.Component]


def build_app(model: str | None = None, preload: bool = True) -> gr.Blocks:
    """The whole page. `model` picks the dropdown's default; `preload` starts loading it before anyone asks.

    On ZeroGPU the model was loaded at import (`models.load_for_zero_gpu`); the page shows it and cannot switch it.
    """
    zero_gpu = on_zero_gpu()
    model = RESIDENT.name if zero_gpu and RESIDENT.name else model or default_model()
    check_allowed(model)
    if preload and not zero_gpu:
        RESIDENT.preload(model)
    page = Page()
    named: Named = {}
    with gr.Blocks(title="slerpviz: token merging with SLERP", analytics_enabled=False) as demo:
        gr.Markdown(INTRO)
        with gr.Row():
            with gr.Column(scale=3):
                prompt_controls(named, model, zero_gpu)
                examples_place = gr.Column()  # filled below, once the controls the examples set exist
            with gr.Column(scale=2):
                merge_controls(named, page._num_layers())
        with examples_place:
            named["examples"] = example_list(named, page)
        output_panels(named)
        plot_views(named)
        # What this page shows, per session: Stop finalises the panels from it; previews and Run skip re-sending plots.
        view = gr.State(PageView())  # Gradio deep-copies it for each session (a callable would be a public endpoint)
        form = {**{name: named[name] for name in FIELDS}, "view": view}
        wire_generation(page, named, form, view)
        wire_previews(page, named, form)
        named["labels_from"].submit(page.pairing_window, [named["labels_from"], view], [named["pairing"]],
                                    api_visibility="private", concurrency_limit=None, show_progress="hidden",
                                    trigger_mode="always_last")
        wire_model(page, named, demo)
    open_queue(demo)
    return demo


def components(named: Named, names) -> list:
    return [named[name] for name in names]


# --------------------------------------------------------------------------------------------------------------------
# The controls: prompt and model on the left, merge settings on the right
# --------------------------------------------------------------------------------------------------------------------


def prompt_controls(named: Named, model: str, zero_gpu: bool) -> None:
    """The prompt, the model menu and the chat template, Run and Stop, and the status line."""
    named["prompt"] = gr.Textbox(label="Prompt", lines=6, max_lines=14, elem_id="prompt",
                                 placeholder="Type a prompt, or click an example below")
    with gr.Row():
        named["model"] = gr.Dropdown(
            [model] if zero_gpu else list(ALLOWED_MODELS), value=model, label="Model", scale=3,
            interactive=not zero_gpu, elem_id="model",
            info="Loaded when the Space starts (ZeroGPU)." if zero_gpu else
            "One model on the device at a time, shared by everyone; changing it waits for running "
            "generations, then reloads.")
        named["chat"] = gr.Checkbox(value=True, label="Chat template", scale=1, elem_id="chat",
                                    info="Wrap the prompt as a user turn (instruct models).")
    with gr.Row():
        named["run"] = gr.Button("Run", variant="primary", elem_id="run")
        named["stop"] = gr.Button("Stop", variant="stop", elem_id="stop")
    named["status"] = gr.Markdown("**Starting…**", elem_id="status", label="Status")


def merge_controls(named: Named, layers: int) -> None:
    """Where and how to merge: cutoffs, protected spans, method, positions, mode, the presets, the further merge
    settings, and the generation's length, temperature and seed.

    The controls' initial values are also the API's defaults (gradio_client fills in what a call leaves out with
    them), so they stay the plain settings older calls were written against. The page itself opens on the
    recommended preset for the loaded model: Page.on_open sets it as the page opens.
    """
    cutoff_controls(named, layers)
    preset_controls(named)
    more_merge_settings(named)
    with gr.Row():
        named["max_new_tokens"] = gr.Slider(1, MAX_NEW_TOKENS, value=48, step=1, precision=0,
                                            label="Max new tokens", elem_id="max-new-tokens")
        named["temperature"] = gr.Slider(0.0, MAX_TEMPERATURE, value=0.0, step=0.05,
                                         label="Temperature", info="0 = greedy")
        named["seed"] = gr.Number(value=0, precision=0, label="Seed", minimum=0)


def cutoff_controls(named: Named, layers: int) -> None:
    """The cutoff and further cutoffs (for a model of `layers` layers), the protected spans, method, positions and
    mode."""
    named["cutoff"] = gr.Slider(
        0, layers, value=min(15, layers), step=1, precision=0, label="Cutoff layer", elem_id="cutoff",
        info="Merge before this decoder layer (0 = at the embeddings).")
    named["more_cutoffs"] = gr.Dropdown(
        list(range(layers + 1)), value=[], multiselect=True,
        allow_custom_value=True,  # the engine checks the range, per model
        label="Further cutoffs (optional)",
        info="Merge again at these layers: each stage halves the sequence. A layer listed twice (as the turbo "
             "preset does) merges twice there: groups of up to four tokens.")
    with gr.Row():
        named["keep_start"] = gr.Slider(0, 2048, value=0, step=1, precision=0, label="Keep start",
                                        info="Protected tokens at the start.", elem_id="keep-start")
        named["keep_end"] = gr.Slider(0, 2048, value=0, step=1, precision=0, label="Keep end",
                                      info="Protected tokens at the end.", elem_id="keep-end")
        named["keep_recent"] = gr.Slider(0, 2048, value=0, step=1, precision=0, label="Keep recent",
                                         info="The last tokens never merged, all of a shorter prompt "
                                              "(recommended, fast: 32).",
                                         elem_id="keep-recent")
    with gr.Row():
        named["method"] = gr.Radio(list(METHODS), value="slerp", label="Method")
        named["positions"] = gr.Radio(list(POSITION_MODES), value="mean", label="Positions")
    named["mode"] = gr.Radio(list(MODES), value="cached", label="Mode")


def preset_controls(named: Named) -> None:
    """The preset menu and its button, with a line on each preset and, for whoever asks, what each does in full."""
    with gr.Group():
        gr.Markdown(preset_note(), elem_id="preset-note", padding=True)
        with gr.Row():
            named["preset_name"] = gr.Dropdown(list(PRESETS), value=OPENING_PRESET, show_label=False,
                                               container=False, elem_id="preset-name", scale=1)
            named["use_preset"] = gr.Button("Use this preset", size="sm", elem_id="preset", scale=1)
        # A line each above; what each preset does in full only for whoever asks.
        with gr.Accordion("What each preset does", open=False, elem_id="preset-details"):
            gr.Markdown(preset_details(), elem_id="preset-details-text")


def more_merge_settings(named: Named) -> None:
    """The folded settings: merge ratio (or one per cutoff), pair choice with its attention controls, proportional
    attention."""
    with gr.Accordion("More merge settings: ratio, pair choice, attention, proportional attention", open=False):
        named["ratio"] = gr.Slider(0.0, 1.0, value=1.0, step=0.05, label="Merge ratio", elem_id="ratio",
                                   info="Share of the eligible pairs merged at each cutoff (1 = all).")
        named["ratios"] = gr.Textbox(value="", label="Ratio per cutoff (optional)", elem_id="ratios",
                                     placeholder="e.g. 0.5, 1",
                                     info="One ratio per cutoff, in layer order; overrides the slider.")
        named["choice"] = gr.Radio(
            list(CHOICES), value="consecutive", label="Pair choice", elem_id="choice",
            info="Which pairs, when the ratio is below 1: the first ones, spread evenly, the most similar "
                 "at the cutoff, or the least attended there.")
        named["attention_controls"] = attention_controls(named)
        named["proportional"] = gr.Checkbox(
            value=False, label="Proportional attention",
            info="Add log(tokens held) to a merged key's attention logit.")


def attention_controls(named: Named) -> gr.Row:
    """The window, budget, kept share and reach of the `attention` choice (MergeSettings' defaults at first),
    hidden for the other choices."""
    defaults = MergeSettings()
    with gr.Row(visible=False, elem_id="attention-controls") as row:
        named["attention_window"] = gr.Number(
            value=defaults.attention_window, precision=0, minimum=1,
            label="Attention window W", elem_id="attention-window",
            info="Tokens are scored by the attention the last W prompt tokens pay them at the cutoff.")
        named["attention_keep"] = gr.Number(
            value=defaults.attention_keep, precision=0, minimum=0,
            label="Keep most attended", elem_id="attention-keep",
            info="This many of the most-attended tokens never merge.")
        named["attention_keep_share"] = gr.Number(
            value=defaults.attention_keep_share, minimum=0, maximum=1, step=0.0625,
            label="Kept share of a long prompt", elem_id="attention-keep-share",
            info="On a long prompt the kept budget grows to this share of its tokens (0: fixed).")
        named["attention_reach"] = gr.Number(
            value=defaults.attention_reach, precision=0, minimum=0,
            label="Reach", elem_id="attention-reach",
            info="A pair ranks with the most attended token within this many tokens either side.")
    return row


def example_list(named: Named, page: Page) -> gr.Dataset:
    """The examples, by label only: a click asks the page for the values, so a preset is read for the model loaded
    then."""
    return gr.Dataset(components=[named["prompt"]], samples=[[e.label] for e in page.examples],
                      sample_labels=[e.label for e in page.examples], type="index",
                      label="Examples (click to fill in, then Run)", elem_id="examples")


# --------------------------------------------------------------------------------------------------------------------
# The outputs: the two generations side by side, the comparison, the plots
# --------------------------------------------------------------------------------------------------------------------


def output_panels(named: Named) -> None:
    """The base and the merged generation side by side, each with its figures, and the comparison below."""
    with gr.Row(equal_height=True):
        with gr.Column(elem_classes="panel-base"):
            gr.Markdown("### Base model")
            named["base_text"] = gr.Textbox(label="Base output", lines=8, max_lines=16, interactive=False,
                                            elem_id="base-text", elem_classes="generation", buttons=["copy"])
            named["base_stats"] = gr.Markdown(elem_id="base-stats", label="Base figures")
        with gr.Column(elem_classes="panel-merged"):
            gr.Markdown("### Merged model")
            named["merged_text"] = gr.Textbox(label="Merged output", lines=8, max_lines=16, interactive=False,
                                              elem_id="merged-text", elem_classes="generation", buttons=["copy"])
            named["merged_stats"] = gr.Markdown(elem_id="merged-stats", label="Merged figures")
    named["comparison"] = gr.Markdown(elem_id="comparison", label="Comparison")


def plot_views(named: Named) -> None:
    """The pairing plot and where its labels start, the lengths, latency and KV plots, and the notes."""
    named["pairing"] = gr.Plot(label="Token pairing", elem_id="pairing-plot", show_label=False)
    named["labels_from"] = gr.Number(
        value=0, precision=0, minimum=0, label="Token labels from", elem_id="labels-from",
        info=f"A long prompt's pairing plot labels {pairing_data.DETAIL_TOKENS} tokens from here (with hover text "
             "and links); the rest shows as markers coloured by pair cosine.")
    named["lengths"] = gr.Plot(label="Sequence length and attention cost per layer", elem_id="length-plot",
                               show_label=False)
    with gr.Row():
        named["latency"] = gr.Plot(label="Per-token latency", elem_id="latency-plot", show_label=False)
        named["kv"] = gr.Plot(label="KV cache per layer", elem_id="kv-plot", show_label=False)
    with gr.Accordion("Notes: SLERP vs LERP, positions, modes, timing", open=False):
        gr.Markdown(NOTES)


# --------------------------------------------------------------------------------------------------------------------
# The events
# --------------------------------------------------------------------------------------------------------------------


def wire_generation(page: Page, named: Named, form: dict, view: gr.State) -> None:
    """/plan and /generate for clients, and the page's Run and Stop.

    The form goes to its callbacks by field name, in the form's order: the API takes it in that order, with those
    names. preprocess=False: the callbacks get the values as sent and check each one themselves (slerpviz.app.form), so
    a bad value from any client gets a message naming the field, never a silent rounding or Gradio's generic error.
    Planning only tokenises, so it never waits behind a generation; the generation queues for the device. Neither
    ever starts a model load.
    """
    plan = dict(inputs=None, inputs_kwargs=form, outputs=components(named, PlanViews._fields), preprocess=False,
                concurrency_limit=None, show_progress="hidden")
    generate = dict(inputs=None, inputs_kwargs=form, outputs=components(named, Panels._fields), preprocess=False,
                    concurrency_id="device", concurrency_limit=1,
                    show_progress_on=components(named, ("base_text", "merged_text")))
    # The API, /plan and /generate, for clients: every view in each one's last message. No control triggers them.
    gr.on([], page.plan, api_name="plan", **plan)
    gr.on([], page.generate, api_name="generate", **generate)
    # The page's Run: the same two steps, never sending a pairing plot the page already shows, nor one twice: the
    # plan's picture only where the page lacks it, the one drawn once the prompt has run (pair cosines, a `similar`
    # or `attention` plan) once (Page.run_plan, Page.run_generate).
    planned = named["run"].click(page.run_plan, api_visibility="private", **plan)
    generating = planned.success(page.run_generate, api_visibility="private", **generate)
    # Cancel first, then finalise: panels written with the cancel could be overwritten by the last message the
    # cancelled generation had already sent. The plan is cancelled too: Stop pressed while it still runs (a long
    # prompt) must not let the generation start after it.
    named["stop"].click(None, None, None, cancels=[planned, generating], api_visibility="private", queue=False).then(
        page.stopped, [view], components(named, StoppedPanels._fields), api_visibility="private", queue=False)


def wire_previews(page: Page, named: Named, form: dict) -> None:
    """The pairing plot and lengths redrawn as the form changes (an example, a preset, a released slider, a changed
    menu, a submitted number), and the attention controls shown for the `attention` choice only."""
    preview = dict(fn=page.preview, inputs=None, inputs_kwargs=form, outputs=components(named, PlanViews._fields),
                   preprocess=False, api_visibility="private", concurrency_limit=None, show_progress="hidden",
                   trigger_mode="always_last")
    named["prompt"].blur(**preview)
    named["examples"].click(page.fill_example, [named["examples"]],
                            components(named, (*EXAMPLE_FIELDS, *MERGE_FIELDS)), api_visibility="private",
                            queue=False, show_progress="hidden").then(**preview)
    named["use_preset"].click(page.fill_preset, [named["preset_name"]], components(named, MERGE_FIELDS),
                              api_visibility="private", queue=False, show_progress="hidden").then(**preview)
    for slider in components(named, ("cutoff", "keep_start", "keep_end", "keep_recent", "ratio")):
        slider.release(**preview)
    for control in components(named, ("more_cutoffs", "chat", "choice")):
        control.change(**preview)
    for control in components(named, ("ratios", "attention_window", "attention_keep", "attention_keep_share",
                                      "attention_reach")):
        control.submit(**preview)
    # The attention window, budget and reach mean something for the `attention` choice only.
    named["choice"].change(lambda chosen: gr.update(visible=chosen == "attention"), [named["choice"]],
                           [named["attention_controls"]], api_visibility="private", queue=False,
                           show_progress="hidden")


def wire_model(page: Page, named: Named, demo: gr.Blocks) -> None:
    """The model menu, and what the page sets as it opens.

    Switching the shared model is the page's own control, not an API: private (no client library reaches it), and
    in the device's queue, so it waits for running generations and none starts during it. A raw request still
    reaches it, so the resident model admits a switch only to an allowed model, when no other load is under way, and at most
    one per interval (ResidentModel.admit_switch). `select`, not `input`: Gradio's Dropdown sends `input` when an
    option is picked and again on the blur that follows, so one pick would switch twice.
    """
    model_inputs = components(named, ("model", "cutoff", "more_cutoffs"))  # load_model(model, cutoff, more_cutoffs)
    named["model"].select(page.load_model, model_inputs, components(named, ModelControls._fields),
                          api_visibility="private", concurrency_id="device", concurrency_limit=1)
    demo.load(page.on_open, [named["model"]], components(named, OpeningControls._fields), api_visibility="private",
              concurrency_limit=None)


def open_queue(demo: gr.Blocks) -> None:
    """The bounded queue every event goes through, with each page's and each address's share of it.

    api_open=False: Gradio's REST routes (/run/..., /api/...) call an event directly, outside the queue and its
    concurrency groups, so a model switch or a generation sent there would run beside the one on the device. Closed,
    every queued event is reached through the queue only (the page, gradio_client and /call all join it).
    """
    demo.queue(max_size=int(os.environ.get("SLERPVIZ_QUEUE_SIZE", QUEUE_SIZE)), default_concurrency_limit=1,
               api_open=False)
    # The queue's bound is for everyone together; each page and each address gets at most a share of it. Behind a
    # proxy every request comes from the proxy's address: a Space's, or Gradio's own Node server when it renders the
    # page server-side ($GRADIO_SSR_MODE, as Gradio reads it).
    behind_proxy = get_space() is not None or os.environ.get("GRADIO_SSR_MODE", "False").lower() == "true"
    limit_queue_per_client(demo._queue, ClientLimit.from_environment(behind_proxy=behind_proxy))


def serve(demo: gr.Blocks, host: str | None = None, port: int | None = None, share: bool = False, **options):
    """Launch the page with its theme and styles (gradio 6 takes those at launch), refusing uploads: the page takes
    no files, and Gradio's upload route would write whatever it is sent (`admission.RefuseUploads`)."""
    app_kwargs = dict(options.pop("app_kwargs", None) or {})
    app_kwargs["middleware"] = [*app_kwargs.get("middleware", ()), Middleware(RefuseUploads)]
    options["app_kwargs"] = app_kwargs
    # Gradio's static file workers ($GRADIO_NUM_WORKERS) would take uploads in processes of their own, past the refusal.
    options["num_workers"] = 0
    return demo.launch(server_name=host, server_port=port, share=share, css=CSS, theme=gr.themes.Soft(),
                       footer_links=["api"], **options)
