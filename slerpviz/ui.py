"""The Gradio page: base and merged generations streamed side by side, with the Plotly views.

The page only wires. What it shows comes from the library: the engine runs the two generations, `interleave`
interleaves them step by step (so each is timed on its own), the small summary functions below turn traces into
the panels' figures, and `slerpviz.plots` draws the pictures.

One model lives on the device at a time (`EngineHolder`); generations and model swaps queue for it one at a time,
and a bounded queue tells everyone else their place in line.
"""

from __future__ import annotations

import gc
import html
import logging
import os
import threading
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path

import gradio as gr
import torch

from . import plots
from .engine import MODES, MergeSettings, MergingEngine, Sampling, Trace, interleave
from .merge import CHOICES, METHODS, POSITION_MODES
from .models import ALLOWED_MODELS, EMBEDDED, check_allowed, load

log = logging.getLogger(__name__)

GPU_MODEL = "mistralai/Mistral-7B-Instruct-v0.2"
GPU_MODEL_MEMORY = 20 * 2**30  # bf16 weights (~14.5 GB) plus room for the caches of both generations
QUEUE_SIZE = 64  # bounded: twenty users at once all get a place in line, a flood gets "queue full"
ASSETS = Path(__file__).resolve().parent.parent / "assets"
# Streaming a latency or KV figure costs more than a line of text; refresh them every few tokens and at the end.
PLOT_EVERY = 8

try:  # On a ZeroGPU Space the GPU is attached only inside functions under this decorator; elsewhere a no-op.
    import spaces

    gpu_task = spaces.GPU(duration=120)
except ImportError:  # pragma: no cover - depends on the machine
    def gpu_task(function):
        return function


def default_model() -> str:
    """$SLERPVIZ_MODEL if set; Mistral-7B-Instruct where a GPU has room for it; else the embedded model."""
    chosen = os.environ.get("SLERPVIZ_MODEL")
    if chosen:
        return chosen
    if torch.cuda.is_available() and torch.cuda.get_device_properties(0).total_memory >= GPU_MODEL_MEMORY:
        return GPU_MODEL
    return EMBEDDED


# --------------------------------------------------------------------------------------------------------------------
# The model on this device
# --------------------------------------------------------------------------------------------------------------------


def load_on_device(name: str, progress: Callable[[str], None]) -> MergingEngine:
    """Load on the GPU where there is one (the embedded model too, which `load` otherwise keeps on the CPU)."""
    return load(name, device="cuda" if torch.cuda.is_available() else None, progress=progress)


class EngineHolder:
    """The one engine on this device.

    A load runs in a background thread so callers can show its progress instead of a frozen page; callers that
    arrive while a load is under way follow that load rather than start another. `device_lock` is held around every
    forward step, so at most one step runs on the device at any moment, whatever the queue does on a cancel.
    """

    def __init__(self, loader: Callable[..., MergingEngine] | None = None):
        self._loader = loader or load_on_device
        self._state = threading.Lock()  # guards the fields below
        self.device_lock = threading.Lock()
        self.name: str | None = None
        self.engine: MergingEngine | None = None
        self.message = ""
        self._thread: threading.Thread | None = None
        self._target: str | None = None
        self._outcome: tuple[str, BaseException | None] | None = None

    @property
    def busy_loading(self) -> str | None:
        with self._state:
            return self._target if self._thread is not None and self._thread.is_alive() else None

    def loading(self, name: str, poll: float = 0.25) -> Iterator[str]:
        """Make `name` the loaded model, yielding progress lines until it is; raise if its load fails."""
        check_allowed(name)
        while True:
            with self._state:
                if self.name == name and self.engine is not None:
                    return
                if self._thread is None or not self._thread.is_alive():
                    self._start(name)
                thread, target = self._thread, self._target
            while thread.is_alive():
                yield self.message or f"Loading {target}"
                thread.join(poll)
            with self._state:
                outcome = self._outcome
            if outcome is not None and outcome[0] == name and outcome[1] is not None:
                raise outcome[1]

    def ensure(self, name: str) -> MergingEngine:
        for _ in self.loading(name):
            pass
        return self.engine

    def preload(self, name: str) -> None:
        """Start loading in the background now (at startup), so the first visitor finds the model ready sooner."""
        with self._state:
            if self.name != name and (self._thread is None or not self._thread.is_alive()):
                self._start(name)

    def _start(self, name: str) -> None:
        self._target, self._outcome, self.message = name, None, f"Loading {name}"
        if torch.cuda.is_available():
            # Free the old model first: two 7B models do not fit on one GPU. On a CPU the old one keeps serving
            # until the new one is ready, and stays if the new one fails to load.
            self.engine, self.name = None, None
            gc.collect()
            torch.cuda.empty_cache()
        self._thread = threading.Thread(target=self._load, args=(name,), name=f"load {name}", daemon=True)
        self._thread.start()

    def _load(self, name: str) -> None:
        def progress(message: str) -> None:
            self.message = message

        try:
            engine = self._loader(name, progress=progress)
        except BaseException as error:  # reported to every caller following this load
            log.exception("loading %s failed", name)
            with self._state:
                self._outcome = (name, error)
            return
        with self._state:
            self.engine, self.name, self._outcome = engine, name, (name, None)


ENGINES = EngineHolder()


# --------------------------------------------------------------------------------------------------------------------
# Inputs
# --------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Request:
    prompt: str
    model: str
    chat: bool
    settings: MergeSettings
    sampling: Sampling
    mode: str


def parse_cutoffs(cutoff, more_cutoffs) -> tuple[int, ...]:
    """The main cutoff plus any further ones (a list, or text like "20, 25"), each layer once, in order."""
    if more_cutoffs is None:
        more = []
    elif isinstance(more_cutoffs, str):
        more = [part for part in more_cutoffs.replace(";", ",").split(",") if part.strip()]
    else:
        more = list(more_cutoffs)
    layers = set()
    for value in [cutoff, *more]:
        if value is None or value == "":
            continue
        try:
            number = float(value)
        except (TypeError, ValueError):
            raise ValueError(f"cutoff {value!r} is not a layer number") from None
        if number != int(number):
            raise ValueError(f"cutoff {value!r} is not a whole layer number")
        layers.add(int(number))
    return tuple(sorted(layers))


def whole(value, name: str) -> int:
    if value is None or float(value) != int(float(value)):
        raise ValueError(f"{name} must be a whole number (got {value!r})")
    return int(float(value))


def parse_request(prompt, model, chat, cutoff, more_cutoffs, keep_start, keep_end, method, positions, mode,
                  max_new_tokens, temperature, seed, ratio=1.0, choice="consecutive", proportional=False) -> Request:
    """The page's raw inputs as engine settings; a bad value raises ValueError with a message for the page."""
    if not prompt or not str(prompt).strip():
        raise ValueError("the prompt is empty: type a prompt or click an example")
    model = model or EMBEDDED
    check_allowed(model)
    if method not in METHODS:
        raise ValueError(f"unknown merge method {method!r}; choose one of {', '.join(METHODS)}")
    if positions not in POSITION_MODES:
        raise ValueError(f"unknown positions mode {positions!r}; choose one of {', '.join(POSITION_MODES)}")
    if mode not in MODES:
        raise ValueError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}")
    if choice not in CHOICES:
        raise ValueError(f"unknown pair choice {choice!r}; choose one of {', '.join(CHOICES)}")
    settings = MergeSettings(
        cutoffs=parse_cutoffs(cutoff, more_cutoffs), keep_start=whole(keep_start, "keep start"),
        keep_end=whole(keep_end, "keep end"), method=method, positions=positions,
        ratio=1.0 if ratio is None else float(ratio), choice=choice, proportional=bool(proportional),
    )
    sampling = Sampling(max_new_tokens=whole(max_new_tokens, "max new tokens"),
                        temperature=float(temperature or 0.0), seed=whole(seed or 0, "seed"))
    return Request(str(prompt), model, bool(chat), settings, sampling, mode)


# --------------------------------------------------------------------------------------------------------------------
# Two generations, step by step
# --------------------------------------------------------------------------------------------------------------------


@gpu_task
def generation_steps(request: Request) -> Iterator[tuple[Trace, Trace]]:
    """The GPU part of a request: both generations, yielding (base trace, merged trace) after every step pair.

    It reaches the model through the module's holder, not an argument: on ZeroGPU the arguments and what it yields
    are pickled across to a GPU worker process, and plain settings and traces pickle, a model and its locks do not.
    """
    holder = ENGINES
    engine = holder.engine
    ids = engine.encode(request.prompt, request.chat)
    base = engine.start(ids, MergeSettings(), request.sampling, request.mode)
    merged = engine.start(ids, request.settings, request.sampling, request.mode)
    for _ in interleave(base, merged, lock=holder.device_lock):
        yield base.trace, merged.trace


# --------------------------------------------------------------------------------------------------------------------
# What the panels say
# --------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Figures:
    """One panel's live figures, from its own steps only."""

    tokens: int
    first_token_s: float | None
    tokens_per_s: float | None  # decode rate: tokens after the first over their own seconds
    elapsed_s: float
    kv_bytes: int


def panel_figures(trace: Trace) -> Figures:
    tokens = len(trace.generated_ids)
    decode = sum(trace.decode_s)
    return Figures(
        tokens=tokens,
        first_token_s=trace.prefill_s if tokens else None,
        tokens_per_s=len(trace.decode_s) / decode if decode > 0 else None,
        elapsed_s=(trace.prefill_s + decode) if tokens else 0.0,
        kv_bytes=sum(trace.kv_bytes_per_layer),
    )


@dataclass(frozen=True)
class Agreement:
    first_difference: int | None  # index of the first generated token that differs; None when identical
    agreeing: int  # positions where both generated the same token
    compared: int  # the longer of the two generations

    @property
    def share(self) -> float:
        return self.agreeing / self.compared if self.compared else 1.0


def agreement(base_ids: Sequence[int], merged_ids: Sequence[int]) -> Agreement:
    """Compare the two generations position by position; a missing token (one stopped earlier) disagrees."""
    agreeing = sum(a == b for a, b in zip(base_ids, merged_ids))
    first = next((i for i, (a, b) in enumerate(zip(base_ids, merged_ids)) if a != b), None)
    if first is None and len(base_ids) != len(merged_ids):
        first = min(len(base_ids), len(merged_ids))
    return Agreement(first, agreeing, max(len(base_ids), len(merged_ids)))


def human_bytes(count: int) -> str:
    for unit in ("B", "KiB", "MiB", "GiB"):
        if count < 1024 or unit == "GiB":
            return f"{count:.0f} {unit}" if unit == "B" else f"{count:.1f} {unit}"
        count /= 1024
    return f"{count} B"  # pragma: no cover


def _seconds(value: float | None) -> str:
    return "—" if value is None else f"{value:.2f} s"


def panel_markdown(trace: Trace, base: Trace | None = None) -> str:
    """The live figures of one panel; the merged panel (given the base trace) adds what merging saved."""
    figures = panel_figures(trace)
    rows = [
        ("time to first token", _seconds(figures.first_token_s)),
        ("tokens per second (decode)", "—" if figures.tokens_per_s is None else f"{figures.tokens_per_s:.1f}"),
        ("elapsed (own steps)", _seconds(figures.elapsed_s if figures.tokens else None)),
        ("tokens generated", f"{figures.tokens}" + (" · done" if trace.finished else "")),
    ]
    if trace.mode == "recompute":
        rows.append(("KV cache", "none (recompute mode re-runs the whole sequence each step)"))
    else:
        kv = human_bytes(figures.kv_bytes) if figures.kv_bytes else "—"
        if base is not None and figures.kv_bytes and sum(base.kv_bytes_per_layer):
            share = figures.kv_bytes / sum(base.kv_bytes_per_layer)
            kv += f" · {1 - share:.0%} smaller than base"
            if len(base.generated_ids) != figures.tokens:
                kv += f" (base at {len(base.generated_ids)} tokens)"
        rows.append(("KV cache", kv))
    length = f"{trace.prompt_length} prompt tokens"
    if trace.plan_pending:
        rows.append(("sequence", f"{length} → pairs chosen at the cutoff"))
    elif trace.cutoffs:
        stages = "".join(f" → {len(slots)} after layer {layer}" for slots, layer in zip(trace.groups, trace.cutoffs))
        rows.append(("sequence", length + stages))
    else:
        rows.append(("sequence", f"{length} at every layer"))
    return "| live figure | value |\n|---|---|\n" + "\n".join(f"| {name} | {value} |" for name, value in rows)


def comparison_markdown(base: Trace, merged: Trace, token_text: Callable[[int], str]) -> str:
    """Where the two generations part, and how much of them agrees; filled in once both have finished."""
    if not (base.finished and merged.finished):
        return "*The comparison appears when both generations have finished.*"
    result = agreement(base.generated_ids, merged.generated_ids)
    if result.first_difference is None:
        first = f"**Identical**: all {result.compared} generated tokens match."
    else:
        i = result.first_difference

        def shown(ids):
            return f"`{escape(plots.visible_token(token_text(ids[i])))}`" if i < len(ids) else "*(stopped)*"

        first = f"**First difference at generated token {i + 1}**: base {shown(base.generated_ids)} · merged " \
                f"{shown(merged.generated_ids)}."
    return f"{first} **{result.share:.0%}** of tokens agree position by position ({result.agreeing} of " \
           f"{result.compared})."


def status_markdown(base: Trace, merged: Trace, sampling: Sampling) -> str:
    if base.finished and merged.finished:
        return f"**Done**: base {len(base.generated_ids)} tokens, merged {len(merged.generated_ids)} tokens."
    return f"**Generating…** base {len(base.generated_ids)}/{sampling.max_new_tokens} · merged " \
           f"{len(merged.generated_ids)}/{sampling.max_new_tokens} tokens"


def escape(text: str) -> str:
    """Model names, messages and tokens as literal text in Markdown or an error pop-up (both read HTML)."""
    return html.escape(text, quote=False)


def message_for(error: BaseException) -> str:
    """A page-sized message for an error: what went wrong and what to try, never a traceback."""
    if isinstance(error, (torch.OutOfMemoryError, MemoryError)):
        return "Out of memory: try a shorter prompt, fewer new tokens or a smaller model."
    if isinstance(error, ValueError):
        return str(error)
    if isinstance(error, OSError):
        return f"Could not load the model: {error}"
    return f"{type(error).__name__}: {error}"


def page_error(error: BaseException) -> gr.Error:
    if torch.cuda.is_available():
        torch.cuda.empty_cache()
    return gr.Error(escape(message_for(error)), print_exception=not isinstance(error, ValueError))


# --------------------------------------------------------------------------------------------------------------------
# The callbacks
# --------------------------------------------------------------------------------------------------------------------


@dataclass
class Outputs:
    """The components /generate streams to, in pairs: base | merged text, base | merged figures, then the views."""

    base_text: gr.Textbox
    merged_text: gr.Textbox
    base_stats: gr.Markdown
    merged_stats: gr.Markdown
    comparison: gr.Markdown
    pairing: gr.Plot
    lengths: gr.Plot
    latency: gr.Plot
    kv: gr.Plot
    status: gr.Markdown

    def __iter__(self):
        return iter(self.__dict__.values())


class Page:
    """The callbacks, as plain methods so tests can call them without a browser."""

    def __init__(self):
        self.holder = ENGINES

    # The model ------------------------------------------------------------------------------------------------------

    def _layer_controls(self, engine: MergingEngine, cutoff=None, more=None):
        layers = engine.num_layers
        value = min(int(cutoff), layers) if cutoff is not None else layers // 2
        kept = [c for c in (more or []) if str(c).strip().isdigit() and int(c) <= layers]  # drop typed-in junk
        return (gr.update(maximum=layers, value=value),
                gr.update(choices=list(range(layers + 1)), value=kept))

    def load_model(self, model: str, cutoff=None, more_cutoffs=None):
        """Swap the model on the device, streaming progress to the status line; then fit the cutoff controls."""
        try:
            for message in self.holder.loading(model):
                yield f"**Loading…** {escape(message)}", gr.skip(), gr.skip()
        except Exception as error:  # noqa: BLE001 - shown in the page, the app keeps serving
            raise page_error(error) from None
        yield (f"**Ready**: {escape(model)} ({self.holder.engine.num_layers} layers).",
               *self._layer_controls(self.holder.engine, cutoff, more_cutoffs))

    def on_open(self, model: str, cutoff=None, more_cutoffs=None):
        """When a page opens: follow a load under way, or show the model the device holds now.

        A page never swaps the shared model just by opening; that is what the model dropdown is for.
        """
        loaded = self.holder.name
        if loaded is not None and self.holder.busy_loading is None:
            yield (f"**Ready**: {escape(loaded)} ({self.holder.engine.num_layers} layers).",
                   gr.update(value=loaded), *self._layer_controls(self.holder.engine, cutoff, more_cutoffs))
            return
        target = self.holder.busy_loading or model or default_model()
        try:
            for message in self.holder.loading(target):
                yield f"**Loading…** {escape(message)}", gr.skip(), gr.skip(), gr.skip()
        except Exception as error:  # noqa: BLE001
            raise page_error(error) from None
        yield (f"**Ready**: {escape(target)} ({self.holder.engine.num_layers} layers).",
               gr.update(value=target), *self._layer_controls(self.holder.engine, cutoff, more_cutoffs))

    # The plan -------------------------------------------------------------------------------------------------------

    def plan_trace(self, request: Request) -> Trace:
        engine = self.holder.engine
        ids = engine.encode(request.prompt, request.chat)
        engine.validate(ids.shape[-1], request.settings, request.sampling, request.mode)
        return engine.new_trace(ids, request.settings, request.mode)

    def plan(self, prompt, model, chat, cutoff, more_cutoffs, keep_start, keep_end, method, positions, mode,
             max_new_tokens, temperature, seed, ratio=1.0, choice="consecutive", proportional=False):
        """The pairing plot (and sequence lengths per layer) for a prompt, without generating."""
        try:
            request = parse_request(prompt, model, chat, cutoff, more_cutoffs, keep_start, keep_end, method,
                                    positions, mode, max_new_tokens, temperature, seed, ratio, choice, proportional)
            for message in self.holder.loading(request.model):
                yield gr.skip(), gr.skip(), f"**Loading…** {escape(message)}"
            trace = self.plan_trace(request)
        except Exception as error:  # noqa: BLE001
            raise page_error(error) from None
        yield plots.pairing_figure(trace), plots.length_figure(trace), self._plan_status(trace)

    def preview(self, *inputs):
        """The plan as settings change: problems go to the status line, not a pop-up, while the user is typing."""
        try:
            request = parse_request(*inputs)
            if self.holder.name != request.model:
                return gr.skip(), gr.skip(), "*The pairing plot appears once the model is loaded.*"
            trace = self.plan_trace(request)
        except Exception as error:  # noqa: BLE001
            return gr.skip(), gr.skip(), f"**Cannot plan**: {escape(message_for(error))}"
        return plots.pairing_figure(trace), plots.length_figure(trace), self._plan_status(trace)

    @staticmethod
    def _plan_status(trace: Trace) -> str:
        if trace.plan_pending:
            return (f"{trace.prompt_length} prompt tokens. The *similar* choice picks its pairs from the hidden "
                    "states at the cutoff: the pairing appears once the prompt has run. Press Run to generate.")
        if not trace.cutoffs:
            return f"{trace.prompt_length} prompt tokens; no cutoff, so the merged side runs the base model."
        after = ", ".join(f"{len(g)} after layer {c}" for g, c in zip(trace.groups, trace.cutoffs))
        return f"{trace.prompt_length} prompt tokens → {after}. Press Run to generate."

    # The generation -------------------------------------------------------------------------------------------------

    def generate(self, prompt, model, chat, cutoff, more_cutoffs, keep_start, keep_end, method, positions, mode,
                 max_new_tokens, temperature, seed, ratio=1.0, choice="consecutive", proportional=False):
        """Stream the base and the merged generation side by side, token by token, with the four views."""
        skip = gr.skip()
        try:
            request = parse_request(prompt, model, chat, cutoff, more_cutoffs, keep_start, keep_end, method,
                                    positions, mode, max_new_tokens, temperature, seed, ratio, choice, proportional)
            for message in self.holder.loading(request.model):
                yield (skip,) * 9 + (f"**Loading…** {escape(message)}",)
            engine = self.holder.engine
            plan = self.plan_trace(request)  # validates everything before the first step
        except Exception as error:  # noqa: BLE001
            raise page_error(error) from None

        pending = "*The comparison appears when both generations have finished.*"
        yield ("", "", "", "", pending, plots.pairing_figure(plan), plots.length_figure(plan), skip, skip,
               "**Prefill**: running the prompt through both models…")
        base = merged = None
        steps = 0
        pairs = generation_steps(request)
        try:
            for base, merged in pairs:
                steps += 1
                first = steps == 1
                views = first or steps % PLOT_EVERY == 0
                yield (
                    base.text, merged.text, panel_markdown(base), panel_markdown(merged, base),
                    pending,
                    plots.pairing_figure(merged) if first else skip,  # now with the pair cosines
                    plots.length_figure(merged, base) if first else skip,
                    plots.latency_figure(base, merged) if views else skip,
                    plots.kv_figure(base, merged) if views else skip,
                    status_markdown(base, merged, request.sampling),
                )
        except Exception as error:  # noqa: BLE001
            raise page_error(error) from None
        finally:
            pairs.close()  # Stop, or a client gone: both runs end here, at once
        if base is None:
            return
        # The runs mark themselves finished only once exhausted, after the last step was shown: show the end, with
        # every view in full so that an API client's last message holds the whole picture.
        yield (base.text, merged.text, panel_markdown(base), panel_markdown(merged, base),
               comparison_markdown(base, merged, lambda token: engine.tokenizer.decode([token])),
               plots.pairing_figure(merged), plots.length_figure(merged, base), plots.latency_figure(base, merged),
               plots.kv_figure(base, merged), status_markdown(base, merged, request.sampling))

    @staticmethod
    def stopped():
        return "**Stopped**: both generations were cancelled together."


# --------------------------------------------------------------------------------------------------------------------
# The page
# --------------------------------------------------------------------------------------------------------------------

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
instead of single vectors: θ comes out near 90° for every pair and the result is about (a + b)/√2.

**Positions.** *mean*: a slot sits at the mean position of its tokens; *first*: at its first token's; *renumber*:
slots are renumbered 0, 1, 2, … (the article). **Modes.** *cached*: the prompt is merged once at prefill and later
tokens decode against a KV cache per layer (shorter after the cutoff). *recompute*: no cache; every step re-runs and
re-merges the whole sequence (the article's semantics, slower).

**More merge settings.** *Merge ratio* merges only that share of the eligible pairs; *pair choice* picks them:
the first ones (*consecutive*), spread evenly (*uniform*), or the most similar neighbours at the cutoff (*similar*,
planned from the hidden states during the prefill, so its pairing plot appears once the prompt has run).
*Proportional attention* raises each merged key's attention logit by log(tokens it holds), so a slot standing for two
tokens draws about as much attention as the two did.

**Protected spans.** keep-start / keep-end tokens are never merged (for example the chat template's system header);
the first and last prompt tokens always stay alone. **Timing.** Time to first token includes the prefill; tokens per
second counts the decode steps; on a GPU each step is synchronised before its clock stops.
"""

CSS = """
.panel-base h3 { color: #4C78A8; }
.panel-merged h3 { color: #F58518; }
.generation textarea { font-size: 0.95rem; line-height: 1.45; }
"""


# The article's merge: every eligible pair, consecutive, no proportional attention.
PLAIN_MERGE = (1.0, "consecutive", False)
# From the speed x fidelity frontier on the embedded model (README, `python -m slerpviz.bench frontier`).
RECOMMENDED = dict(cutoff=15, ratio=1.0, choice="similar", proportional=False,
                   label="Recommended preset: cutoff 15, most similar pairs")


def example_rows() -> tuple[list[list], list[str]]:
    """Clickable examples: (prompt, cutoff, keep start, keep end, method, positions, mode, max new tokens, merge
    ratio, pair choice, proportional attention)."""
    rows = [
        ["Explain in three short sentences why the sky is blue.", 15, 0, 0, "slerp", "mean", "cached", 48],
        ["Write a haiku about a lighthouse in winter.", 10, 0, 0, "slerp", "mean", "cached", 32],
        ["List five uses of a paperclip, one per line.", 20, 0, 0, "lerp", "mean", "cached", 48],
        ["What is the capital of France? Answer in one word.", 8, 0, 0, "seed-2024", "renumber", "recompute", 12],
    ]
    rows = [row + list(PLAIN_MERGE) for row in rows]
    rows.append(["Explain in three short sentences why the sky is blue.", RECOMMENDED["cutoff"], 0, 0, "slerp",
                 "mean", "cached", 48, RECOMMENDED["ratio"], RECOMMENDED["choice"], RECOMMENDED["proportional"]])
    labels = ["Why is the sky blue? (cutoff 15)", "Haiku (cutoff 10)", "Paperclips, lerp (cutoff 20)",
              "Article's seed-2024 code, recompute", RECOMMENDED["label"]]
    document = ASSETS / "examples" / "long_document.txt"
    if document.exists():
        text = document.read_text(encoding="utf-8").strip()
        prompt = f"Summarise the following report in three sentences.\n\n{text}"
        rows.append([prompt, 4, 0, 8, "slerp", "mean", "cached", 16, *PLAIN_MERGE])
        labels.append("Long report (~1,500 tokens): the speed difference shows")
    return rows, labels


def build_app(model: str | None = None, preload: bool = True) -> gr.Blocks:
    """The whole page. `model` picks the dropdown's default; `preload` starts loading it before anyone asks."""
    model = model or default_model()
    check_allowed(model)
    if preload:
        ENGINES.preload(model)
    page = Page()
    layers = ENGINES.engine.num_layers if ENGINES.engine is not None else 30

    with gr.Blocks(title="slerpviz: token merging with SLERP", analytics_enabled=False) as demo:
        gr.Markdown(INTRO)
        with gr.Row():
            with gr.Column(scale=3):
                prompt = gr.Textbox(label="Prompt", lines=6, max_lines=14, elem_id="prompt",
                                    placeholder="Type a prompt, or click an example below")
                with gr.Row():
                    model_box = gr.Dropdown(list(ALLOWED_MODELS), value=model, label="Model", scale=3,
                                            info="One model on the device at a time; changing it reloads.")
                    chat = gr.Checkbox(value=True, label="Chat template", scale=1,
                                       info="Wrap the prompt as a user turn (instruct models).")
                with gr.Row():
                    run_button = gr.Button("Run", variant="primary", elem_id="run")
                    stop_button = gr.Button("Stop", variant="stop", elem_id="stop")
                status = gr.Markdown("**Starting…**", elem_id="status")
                examples_place = gr.Column()  # filled below, once the controls the examples set exist
            with gr.Column(scale=2):
                cutoff = gr.Slider(0, layers, value=min(15, layers), step=1, precision=0, label="Cutoff layer",
                                   info="Merge before this decoder layer (0 = at the embeddings).", elem_id="cutoff")
                more_cutoffs = gr.Dropdown(list(range(layers + 1)), value=[], multiselect=True,
                                           allow_custom_value=True,  # the engine checks the range, per model
                                           label="Further cutoffs (optional)",
                                           info="Merge again at these layers: each stage halves the sequence.")
                with gr.Row():
                    keep_start = gr.Slider(0, 2048, value=0, step=1, precision=0, label="Keep start",
                                           info="Protected tokens at the start.", elem_id="keep-start")
                    keep_end = gr.Slider(0, 2048, value=0, step=1, precision=0, label="Keep end",
                                         info="Protected tokens at the end.", elem_id="keep-end")
                with gr.Row():
                    method = gr.Radio(list(METHODS), value="slerp", label="Method")
                    positions = gr.Radio(list(POSITION_MODES), value="mean", label="Positions")
                mode = gr.Radio(list(MODES), value="cached", label="Mode")
                with gr.Accordion("More merge settings: ratio, pair choice, proportional attention", open=False):
                    ratio = gr.Slider(0.0, 1.0, value=1.0, step=0.05, label="Merge ratio", elem_id="ratio",
                                      info="Share of the eligible pairs merged at each cutoff (1 = all).")
                    choice = gr.Radio(list(CHOICES), value="consecutive", label="Pair choice",
                                      info="Which pairs, when the ratio is below 1: the first ones, spread evenly, "
                                           "or the most similar at the cutoff.")
                    proportional = gr.Checkbox(value=False, label="Proportional attention",
                                               info="Add log(tokens held) to a merged key's attention logit.")
                with gr.Row():
                    max_new_tokens = gr.Slider(1, 512, value=48, step=1, precision=0, label="Max new tokens",
                                               elem_id="max-new-tokens")
                    temperature = gr.Slider(0.0, 2.0, value=0.0, step=0.05, label="Temperature",
                                            info="0 = greedy")
                    seed = gr.Number(value=0, precision=0, label="Seed", minimum=0)

        with examples_place:
            rows, labels = example_rows()
            examples = gr.Examples(rows, [prompt, cutoff, keep_start, keep_end, method, positions, mode,
                                          max_new_tokens, ratio, choice, proportional], example_labels=labels, cache_examples=False,
                                   label="Examples (click to fill in, then Run)")

        with gr.Row(equal_height=True):
            with gr.Column(elem_classes="panel-base"):
                gr.Markdown("### Base model")
                base_text = gr.Textbox(label="Base output", lines=8, max_lines=16, interactive=False,
                                       elem_id="base-text", elem_classes="generation", buttons=["copy"])
                base_stats = gr.Markdown(elem_id="base-stats")
            with gr.Column(elem_classes="panel-merged"):
                gr.Markdown("### Merged model")
                merged_text = gr.Textbox(label="Merged output", lines=8, max_lines=16, interactive=False,
                                         elem_id="merged-text", elem_classes="generation", buttons=["copy"])
                merged_stats = gr.Markdown(elem_id="merged-stats")
        comparison = gr.Markdown(elem_id="comparison")

        pairing = gr.Plot(label="Token pairing", elem_id="pairing-plot", show_label=False)
        lengths = gr.Plot(label="Sequence length and attention cost per layer", elem_id="length-plot",
                          show_label=False)
        with gr.Row():
            latency = gr.Plot(label="Per-token latency", elem_id="latency-plot", show_label=False)
            kv = gr.Plot(label="KV cache per layer", elem_id="kv-plot", show_label=False)
        with gr.Accordion("Notes: SLERP vs LERP, positions, modes, timing", open=False):
            gr.Markdown(NOTES)

        # Later additions go at the end, so that positional API calls written for fewer inputs keep working.
        inputs = [prompt, model_box, chat, cutoff, more_cutoffs, keep_start, keep_end, method, positions, mode,
                  max_new_tokens, temperature, seed, ratio, choice, proportional]
        outputs = list(Outputs(base_text, merged_text, base_stats, merged_stats, comparison, pairing, lengths,
                               latency, kv, status))

        # Planning only tokenises, so it never waits behind a generation; the generation queues for the device.
        planned = run_button.click(page.plan, inputs, [pairing, lengths, status], api_name="plan",
                                   concurrency_limit=None, show_progress="hidden")
        generating = planned.success(page.generate, inputs, outputs, api_name="generate",
                                     concurrency_id="device", concurrency_limit=1,
                                     show_progress_on=[base_text, merged_text])
        # Cancel first, then say so: a status written with the cancel could be overwritten by the last message the
        # cancelled generation had already sent.
        stop_button.click(None, None, None, cancels=[generating], api_visibility="private", queue=False).then(
            page.stopped, None, [status], api_visibility="private", queue=False)

        preview = dict(fn=page.preview, inputs=inputs, outputs=[pairing, lengths, status], api_visibility="private",
                       concurrency_limit=None, show_progress="hidden", trigger_mode="always_last")
        prompt.blur(**preview)
        examples.load_input_event.then(**preview)
        for slider in (cutoff, keep_start, keep_end, ratio):
            slider.release(**preview)
        for control in (more_cutoffs, chat, choice):
            control.change(**preview)

        layer_controls = [cutoff, more_cutoffs]
        model_box.input(page.load_model, [model_box, cutoff, more_cutoffs], [status, *layer_controls],
                        api_name="load_model", concurrency_id="device", concurrency_limit=1)
        demo.load(page.on_open, [model_box, cutoff, more_cutoffs], [status, model_box, *layer_controls],
                  api_visibility="private", concurrency_limit=None)

    demo.queue(max_size=int(os.environ.get("SLERPVIZ_QUEUE_SIZE", QUEUE_SIZE)), default_concurrency_limit=1)
    return demo


def serve(demo: gr.Blocks, host: str | None = None, port: int | None = None, share: bool = False, **options):
    """Launch the page with its theme and styles (gradio 6 takes those at launch)."""
    return demo.launch(server_name=host, server_port=port, share=share, css=CSS, theme=gr.themes.Soft(),
                       footer_links=["api"], **options)
