"""The page's callbacks: what each control does, wired to the library.

They only wire. The form's values are checked by `slerpviz.app.form`, the model work goes through the resident
model (`slerpviz.app.resident`), the text comes from `slerpviz.app.panels` and the pictures from `slerpviz.app.plots`.

Each callback returns a NamedTuple named by its outputs (`Panels`, `PlanViews`, `StoppedPanels`, `ModelControls`,
`OpeningControls`). The layout gives each event its output components in that tuple's field order, so a value cannot
land in the wrong component, and API clients, which get the values in that order, see the same outputs as before.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, NamedTuple

import gradio as gr
import torch
from gradio.components.plot import PlotData

from .. import presets
from . import pairing
from . import panels, plots
from ..tasks import find_passkey
from ..engine import Interrupted, Sampling, Trace
from .examples import examples
from .form import EXAMPLE_FIELDS, MERGE_FIELDS, Form, fit_cutoffs, merge_values, parse
from .resident import RESIDENT, default_model, generation_traces, on_zero_gpu, plan_trace, release_memory
from ..settings import whole
from ..models import ALLOWED_MODELS

DEFAULT_LAYERS = 30  # the controls' range before a model is loaded (the embedded model's depth)
# The page opens on the setting we stand behind, not on the article's (every pair at half the depth), which loses the
# answer; the preset menu shows the same name.
OPENING_PRESET = "recommended"
# Each side is timed on its own steps, but what the page does between them is charged to the step that runs next:
# the server sending an update, and a browser on the same machine (`python app.py` on a laptop) drawing it. With the
# same work on both sides, the page showed the side that stepped second decoding 1.66x faster and reaching its
# first token 1.28x sooner (docs/measurements.md, "The page's own timings"). So the sides take turns by chance
# (slerpviz.generation.interleave), the page is updated at most every SHOW_EVERY_S (and after the prompt, and at the
# end; four updates a second keep the text streaming), and the prompts run SETTLE_S after the page was last told
# to draw: the same two sides now come out at 1.00x and 0.97x.
SHOW_EVERY_S = 0.25
SETTLE_S = 0.25
# Streaming a latency or KV figure costs more than a line of text; refresh them this often and at the end.
PLOT_EVERY_S = 2.0


# --------------------------------------------------------------------------------------------------------------------
# What the callbacks return, by name
# --------------------------------------------------------------------------------------------------------------------


class Panels(NamedTuple):
    """What /generate streams, in pairs: base | merged text, base | merged figures, then the views and the status."""

    base_text: Any
    merged_text: Any
    base_stats: Any
    merged_stats: Any
    comparison: Any
    pairing: Any
    lengths: Any
    latency: Any
    kv: Any
    status: Any


class PlanViews(NamedTuple):
    """What /plan and the preview show: the plan's two views and the status line."""

    pairing: Any
    lengths: Any
    status: Any


class StoppedPanels(NamedTuple):
    """What Stop finalises: both sides' figures, the comparison, the per-step views and the status line."""

    base_stats: Any
    merged_stats: Any
    comparison: Any
    latency: Any
    kv: Any
    status: Any


class ModelControls(NamedTuple):
    """What a model switch updates: the status line, the model menu and the cutoff controls."""

    status: Any
    model: Any
    cutoff: Any
    more_cutoffs: Any


# What a page opening sets: the status line, the model menu and every merge field (MERGE_FIELDS, the cutoffs first).
OpeningControls = NamedTuple("OpeningControls", [(name, Any) for name in ("status", "model", *MERGE_FIELDS)])


def only(outputs: type[NamedTuple], **shown) -> NamedTuple:
    """`outputs` with the components named in `shown` updated and every other one left as it is."""
    return outputs(**{name: shown.get(name, gr.skip()) for name in outputs._fields})


def plot_data(figure) -> PlotData:
    """A figure serialised once. A stream that yields the same PlotData again sends nothing for it (Gradio streams the
    difference from the last message), so within /generate's stream a long prompt's pairing plot crosses the wire
    once, and the message that ends the stream (which Gradio fills with the last values, whole) holds it again, for
    API clients."""
    return PlotData(type="plotly", plot=figure.to_json())


def page_error(error: BaseException) -> gr.Error:
    if not on_zero_gpu() and torch.cuda.is_available():  # on ZeroGPU the GPU was the worker's, and is gone
        torch.cuda.empty_cache()
    return gr.Error(panels.escape(panels.message_for(error)), print_exception=not isinstance(error, ValueError))


@dataclass
class PageView:
    """What one page shows, kept in its session (a gr.State, changed in place): the trace its pairing plot was drawn
    from, and the generation under way, so that Stop can finalise the panels from where the runs stopped."""

    pairing: Trace | None = None
    base: Trace | None = None
    merged: Trace | None = None
    sampling: Sampling | None = None
    token_text: Callable[[int], str] | None = None
    labels_from: int = 0  # where the pairing plot's labelled span starts (long prompts)
    stop: threading.Event | None = None  # set by Stop: the step under way ends at its next layer


def shown_runs(base: Trace, merged: Trace, sampling: Sampling, **views) -> Panels:
    """Both sides' text and figures and the status as the runs stand, with the views given."""
    return Panels(base_text=base.text, merged_text=merged.text, base_stats=panels.panel_markdown(base),
                  merged_stats=panels.panel_markdown(merged, base),
                  status=panels.status_markdown(base, merged, sampling), **views)


# --------------------------------------------------------------------------------------------------------------------
# The callbacks
# --------------------------------------------------------------------------------------------------------------------


class Page:
    """The callbacks, as plain methods so tests can call them without a browser.

    The form's callbacks (`plan`, `preview`, `generate`) take its values positionally in `form.FIELDS` order, as
    tests and older callers pass them, or by name, as the page does; `view` is the session's PageView.
    """

    def __init__(self):
        self.resident = RESIDENT
        self.examples = examples()
        self._showing = threading.Lock()  # one page's preview and Run may both be drawing its pairing plot

    def _num_layers(self) -> int:
        engine = self.resident.engine
        return engine.num_layers if engine is not None else DEFAULT_LAYERS

    # Examples and presets -------------------------------------------------------------------------------------------

    def fill_example(self, index):
        """Every field an example sets (EXAMPLE_FIELDS + MERGE_FIELDS); a preset is read now, for the loaded model."""
        fields = (*EXAMPLE_FIELDS, *MERGE_FIELDS)
        if not isinstance(index, int) or not 0 <= index < len(self.examples):
            return [gr.skip()] * len(fields)
        values = self.examples[index].values(self._num_layers())
        return [values[name] for name in fields]

    def preset_values(self, name: str = OPENING_PRESET) -> dict:
        """A preset as the merge fields' values (MERGE_FIELDS, by name), for the loaded model's depth."""
        layers = self._num_layers()
        return merge_values(presets.preset(name, layers), layers)

    def fill_preset(self, name: str = OPENING_PRESET):
        """The merge fields (MERGE_FIELDS) set to a preset, for the loaded model's depth; the prompt stays."""
        if name not in presets.PRESETS:  # the dropdown offers only these; a raw request may send anything
            return [gr.skip()] * len(MERGE_FIELDS)
        values = self.preset_values(name)
        return [values[field] for field in MERGE_FIELDS]

    # The model ------------------------------------------------------------------------------------------------------

    def _ready(self) -> str:
        return panels.ready_markdown(self.resident.name, self.resident.engine.num_layers)

    def _greeting(self) -> str:
        loaded = self.resident.name is not None and self.resident.busy_loading is None
        return self._ready() if loaded else panels.GREETING

    def _loaded(self, cutoff, more_cutoffs) -> ModelControls:
        """The model loaded: say so, show it in the menu, and fit the cutoff controls to its depth."""
        layers = self.resident.engine.num_layers
        value, kept = fit_cutoffs(layers, cutoff, more_cutoffs)
        return ModelControls(status=self._ready(), model=gr.update(value=self.resident.name),
                             cutoff=gr.update(maximum=layers, value=value),
                             more_cutoffs=gr.update(choices=list(range(layers + 1)), value=kept))

    def load_model(self, model: str, cutoff=None, more_cutoffs=None):
        """The page's model control: switch the shared model, streaming progress to the status line, then fit the
        cutoff controls. It runs in the device's queue, so it waits for running generations and none runs during it.

        A failed switch keeps the previous model: the status says why and the dropdown goes back to it. So does a
        refused one: the menu is the page's control, but any script can send its request, so the resident model
        admits only an allowed model, while no other load is under way, and at most one switch per interval
        (`admit_switch`).
        """
        if on_zero_gpu():
            yield only(ModelControls, status=panels.FIXED_MODEL, model=gr.update(value=self.resident.name))
            return
        try:
            self.resident.admit_switch(model)
            for message in self.resident.switch(model):
                yield only(ModelControls, status=panels.loading_markdown(message))
        except Exception as error:  # noqa: BLE001 - shown in the page, the app keeps serving
            serving = self.resident.name
            warning, status = panels.load_failure(model, error, serving)
            gr.Warning(panels.escape(warning))
            yield only(ModelControls, status=status, model=gr.update(value=serving) if serving else gr.skip())
            return
        yield self._loaded(cutoff, more_cutoffs)

    def on_open(self, model: str):
        """When a page opens: show the model the device holds, follow a load under way, or (on an empty device only)
        load the page's model. A page never swaps a loaded model just by opening.

        The merge fields open on the opening preset: in the first message, for the depth known then, and again for
        the loaded model's depth once it is ready. (The controls' own initial values are the API's defaults, which
        stay as older calls know them.)"""
        try:
            if self.resident.name is None and self.resident.busy_loading is None:
                messages = self.resident.switch(model if model in ALLOWED_MODELS else default_model())
            else:
                messages = self.resident.following(self.resident.busy_loading or self.resident.name)
            opening = self._opening()
            for message in messages:
                yield opening._replace(status=panels.loading_markdown(message))
                opening = only(OpeningControls)  # sent once: later progress lines carry the status only
        except Exception as error:  # noqa: BLE001
            raise page_error(error) from None
        yield self._opening()._replace(status=self._ready(), model=gr.update(value=self.resident.name))

    def _opening(self) -> OpeningControls:
        """The merge fields at the opening preset, the cutoff controls fitted to the depth; status and model as they
        are."""
        layers = self._num_layers()
        values = self.preset_values(OPENING_PRESET)
        return only(OpeningControls, **{
            **values, "cutoff": gr.update(maximum=layers, value=values["cutoff"]),
            "more_cutoffs": gr.update(choices=list(range(layers + 1)), value=values["more_cutoffs"])})

    # The plan -------------------------------------------------------------------------------------------------------

    def _request(self, form: Form, outputs: type[NamedTuple]):
        """The form checked, then its model followed until it is loaded, the load's progress streamed to the status
        line as `outputs`; returns the request. It never starts a load."""
        request = parse(form)
        for message in self.resident.following(request.model):
            yield only(outputs, status=panels.loading_markdown(message))
        return request

    def plan(self, *values, view: PageView | None = None, **fields):
        """The pairing plot (and sequence lengths per layer) for a prompt, without generating. It follows a model
        load under way but never starts one."""
        form = Form(*values, **fields)
        trace = yield from self._plan_trace(form)
        if view is not None:
            view.pairing = trace
        yield PlanViews(pairing=self._pairing_figure(trace, view), lengths=plots.length_figure(trace),
                        status=panels.plan_markdown(trace))

    def run_plan(self, *values, view: PageView | None = None, **fields):
        """The page's Run, before its generation: /plan as the page needs it. The pairing plot goes only where the
        page does not show that picture yet (a preview drew it as the settings were made), and the stream ends on a
        message that changes nothing, so its last values are not sent again whole (see `Page.run_generate`)."""
        form = Form(*values, **fields)
        trace = yield from self._plan_trace(form)
        yield PlanViews(pairing=self._new_pairing(trace, view), lengths=plots.length_figure(trace),
                        status=panels.plan_markdown(trace))
        yield only(PlanViews)

    def _plan_trace(self, form: Form):
        """The form's plan, after following a model load under way (its progress streamed to the status line); any
        problem becomes the page's message."""
        try:
            request = yield from self._request(form, PlanViews)
            return plan_trace(self.resident.engine, request)
        except Exception as error:  # noqa: BLE001
            raise page_error(error) from None

    def preview(self, *values, view: PageView | None = None, **fields):
        """The plan as settings change: problems go to the status line, not a pop-up, while the user is typing. The
        pairing plot is re-sent only when the plan it shows has changed."""
        form = Form(*values, **fields)
        if form.prompt is None or (isinstance(form.prompt, str) and not form.prompt.strip()):
            return only(PlanViews, status=self._greeting())
        try:
            request = parse(form)
            if self.resident.name != request.model or self.resident.busy_loading is not None:
                return only(PlanViews, status=panels.WAITING_FOR_MODEL)
            trace = plan_trace(self.resident.engine, request)
        except Exception as error:  # noqa: BLE001
            return only(PlanViews, status=panels.cannot_plan_markdown(error))
        return PlanViews(pairing=self._new_pairing(trace, view), lengths=plots.length_figure(trace),
                         status=panels.plan_markdown(trace))

    def _new_pairing(self, trace: Trace, view: PageView | None):
        """The pairing plot for `trace`, or gr.skip() where the page shows that picture already (or a richer one, with
        the cosines in); the page's view then holds the trace its plot was drawn from. The check and the claim are one
        step, so a preview and a Run drawing the same plan at once send it once between them."""
        if view is None:
            return self._pairing_figure(trace, None)
        with self._showing:
            if view.pairing is not None and pairing.same_pairing(view.pairing, trace):
                return gr.skip()
            view.pairing = trace
        return self._pairing_figure(trace, view)

    @staticmethod
    def _pairing_figure(trace: Trace, view: PageView | None):
        """The pairing plot, with a pass key in the prompt marked (its tokens and the slots they fell into)."""
        return pairing.pairing_figure(trace, start=view.labels_from if view is not None else 0,
                                    needle=find_passkey(trace.tokens))

    def pairing_window(self, labels_from, view=None):
        """Redraw the pairing plot with its labels (a long prompt's detailed span) from another token."""
        try:
            start = whole(labels_from, "labels from token", 0)
        except ValueError as error:
            raise gr.Error(panels.escape(str(error))) from None
        if view is None or view.pairing is None:
            return gr.skip()
        view.labels_from = start
        return self._pairing_figure(view.pairing, view)

    # The generation -------------------------------------------------------------------------------------------------

    def generate(self, *values, view: PageView | None = None, **fields):
        """Stream the base and the merged generation side by side, token by token, with the four views.

        Every input is checked before any model work; the model must be the one loaded (or loading): a generation
        never switches the shared model. Each view is serialised when it changes and yielded as is in between, so
        the stream carries it once (the pairing plot, heavy for a long prompt, once per run).
        """
        # The API's description is this docstring, so it stays as clients know it. The last message holds every view,
        # for API clients; the page's Run uses `run_generate`.
        yield from self._generate(Form(*values, **fields), view, for_page=False)

    def run_generate(self, *values, view: PageView | None = None, **fields):
        """The page's Run, after its plan: /generate as the page needs it. The pairing plot goes once, when the prompt
        has run (its cosines, and a `similar` or `attention` plan, are known then), and only where it adds to what the
        page shows; every later message leaves it as it is.

        Gradio ends a stream with a message holding its last values whole, and /generate's last message holds every
        view, so there the pairing plot would cross the wire twice per run: here it is left out of the last one.
        """
        yield from self._generate(Form(*values, **fields), view, for_page=True)

    def _generate(self, form: Form, view: PageView | None, for_page: bool):
        view = view if view is not None else PageView()
        try:
            request = yield from self._request(form, Panels)
            engine = self.resident.engine
            plan = plan_trace(engine, request)  # validates everything before the first step
        except Exception as error:  # noqa: BLE001
            raise page_error(error) from None

        def token_text(token: int) -> str:
            return engine.tokenizer.decode([token])

        view.base = view.merged = None
        # Stop may come from here on, the settling pause below included.
        view.stop = None if on_zero_gpu() else threading.Event()  # an Event does not pickle across to ZeroGPU
        view.sampling, view.token_text = request.sampling, token_text
        skip = gr.skip()
        pairing = lengths = latency = kv = skip
        # The page has the plan's lengths from Page.run_plan; API clients get them here.
        yield only(Panels, base_text="", merged_text="", base_stats="", merged_stats="",
                   comparison=panels.PENDING_COMPARISON,
                   lengths=skip if for_page else plot_data(plots.length_figure(plan)), status=panels.PREFILL)
        time.sleep(SETTLE_S)  # time for the page to draw the message above before either side's prompt runs
        base = merged = None
        steps, shown_at, plotted_at = 0, 0.0, 0.0
        pairs = generation_traces(request, view.stop)
        try:
            for base, merged in pairs:
                view.base, view.merged = base, merged
                steps += 1
                if steps == 1:  # the prompt has run: the pair cosines (and a `similar` plan) are known
                    if for_page:
                        pairing = self._new_pairing(merged, view)
                    else:
                        pairing = plot_data(self._pairing_figure(merged, view))
                        view.pairing = merged
                    lengths = plot_data(plots.length_figure(merged, base))
                now = time.monotonic()
                if steps > 1 and now - shown_at < SHOW_EVERY_S:
                    continue
                if steps == 1 or now - plotted_at >= PLOT_EVERY_S:
                    latency = plot_data(plots.latency_figure(base, merged))
                    kv = plot_data(plots.kv_figure(base, merged))
                    plotted_at = now
                yield shown_runs(base, merged, request.sampling, comparison=panels.PENDING_COMPARISON,
                                 pairing=pairing, lengths=lengths, latency=latency, kv=kv)
                shown_at = time.monotonic()
                if for_page:
                    pairing = skip  # sent once: the page keeps it
        except Interrupted:  # Stop: `stopped` finalises the panels
            return
        except Exception as error:  # noqa: BLE001
            raise page_error(error) from None
        finally:
            pairs.close()  # Stop, or a client gone: both runs end here, at once
            release_memory()
        if base is None:
            return
        # The runs mark themselves finished only once exhausted, after the last step was shown: show the end, with
        # every view final, so that an API client's last message holds the whole picture.
        yield shown_runs(base, merged, request.sampling,
                         comparison=panels.comparison_markdown(base, merged, token_text), pairing=pairing,
                         lengths=lengths, latency=plot_data(plots.latency_figure(base, merged)),
                         kv=plot_data(plots.kv_figure(base, merged)))

    def stopped(self, view=None):
        """After Stop has cancelled a generation: finalise every panel at the token where the runs stopped."""
        if view is None or view.sampling is None:
            return only(StoppedPanels, status=panels.NOTHING_GENERATING)
        if view.stop is not None:
            view.stop.set()  # a long prefill ends at its next layer instead of running to its end
        # A step already under way when Stop came finishes on its own; wait for it, so the panels show its token.
        if self.resident.device_lock.acquire(timeout=30):
            self.resident.device_lock.release()
        base, merged = view.base, view.merged
        if base is None or merged is None:
            return only(StoppedPanels, comparison=panels.NOTHING_TO_COMPARE, status=panels.STOPPED_IN_PREFILL)
        if base.finished and merged.finished:  # it had ended before Stop: its "Done" stands
            return only(StoppedPanels)
        return StoppedPanels(base_stats=panels.panel_markdown(base, stopped=True),
                             merged_stats=panels.panel_markdown(merged, base, stopped=True),
                             comparison=panels.comparison_markdown(base, merged, view.token_text, stopped=True),
                             latency=plots.latency_figure(base, merged), kv=plots.kv_figure(base, merged),
                             status=panels.status_markdown(base, merged, view.sampling, stopped=True))
