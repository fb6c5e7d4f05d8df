"""The engine: a Hugging Face causal LM run layer by layer, merging tokens at the cutoffs, and generating.

`MergingEngine` is slerpviz.forward's layer-by-layer model (the one merging forward, its sessions and caches) with
what a caller of text needs on top: the prompt through the chat template, the merge plan as far as it is known ahead,
and runs that generate token by token (slerpviz.generation). The names the app, the command line, the benchmarks and
the tests import from here are those modules' own, re-exported.
"""

from __future__ import annotations

import threading

import torch

from .decode import check_mode as check_decode
from .forward import (  # noqa: F401  (re-exported)
    SUPPORTED_FAMILIES, TESTED_TRANSFORMERS, Interrupted, LayerwiseModel, Layout, Merged,
    Session, cache_lengths, check_supported, check_transformers_version, kv_bytes_per_layer,
)
from .generation import Run, Step, Trace, blank_trace, interleave, record_plan, record_session  # noqa: F401
from .merge import PLANNED_AT_CUTOFF
from .pairs import Stage, plan_stages
from .settings import MODES, MergeSettings, Sampling, check_sampling  # noqa: F401  (the engine's names too)

MAX_CHARS_PER_TOKEN = 64  # far more than any tokenizer puts in one token of text


class MergingEngine(LayerwiseModel):
    """A model and its tokenizer: encode a prompt, plan its merge, and generate base and merged runs from it."""

    def encode(self, prompt: str, chat: bool = True) -> torch.Tensor:
        """Token ids [1, n] of the prompt, through the model's chat template when it has one and chat is on."""
        if not prompt or not prompt.strip():
            raise ValueError("the prompt is empty")
        # Tokenising is not free (30 MB of text takes over a minute): refuse what cannot fit before reading it.
        context = getattr(self.config, "max_position_embeddings", None)
        if context is not None and len(prompt) > MAX_CHARS_PER_TOKEN * context:
            raise ValueError(f"the prompt has {len(prompt):,} characters: more than could fit the model's context of "
                             f"{context:,} tokens (at {MAX_CHARS_PER_TOKEN} characters a token at most)")
        if chat and getattr(self.tokenizer, "chat_template", None):
            messages = [{"role": "user", "content": prompt}]
            ids = self.tokenizer.apply_chat_template(
                messages, add_generation_prompt=True, return_dict=True, return_tensors="pt"
            )["input_ids"]
        else:
            ids = self.tokenizer(prompt, return_tensors="pt")["input_ids"]
        return ids.to(self.device)

    def plan(self, input_ids: torch.Tensor, settings: MergeSettings) -> list[Stage] | None:
        """The merge stages for a prompt, or None for `similar` and `attention`, which are planned at each cutoff."""
        self.validate(input_ids.shape[-1], settings)
        if settings.choice in PLANNED_AT_CUTOFF:
            return None
        return plan_stages(input_ids.shape[-1], settings.cutoffs, settings.keep_start,
                           settings.protected_end(input_ids.shape[-1]),
                           settings.ratio, settings.choice, settings.size_weighted)

    def new_trace(self, input_ids: torch.Tensor, settings: MergeSettings, mode: str = "cached",
                  preview: bool = True) -> Trace:
        """The trace of a run before it starts: the shapes and, with `preview`, the plan as far as it is known
        before the prefill (not for `similar` and `attention`, which depend on the hidden states). A run's own trace
        takes no preview: it records the stages that actually ran, from its session."""
        if preview:
            stages = self.plan(input_ids, settings)  # validates
        else:
            self.validate(input_ids.shape[-1], settings)
            stages = None
        trace = blank_trace(self, input_ids, settings, mode)
        if stages is not None:
            record_plan(trace, stages)
        return trace

    def start(
        self, input_ids: torch.Tensor, settings: MergeSettings = MergeSettings(), sampling: Sampling = Sampling(),
        mode: str = "cached", interrupt: threading.Event | None = None, decode: str | None = None,
    ) -> Run:
        """Validate and plan now; the returned run generates lazily, one token per step. Setting `interrupt` stops
        the step under way at its next layer (a long prefill need not run to its end after Stop). `decode` picks
        the decode steps' path (slerpviz.decode: dynamic, static, compiled; None: `decode.default_mode`, compiled on
        a GPU, dynamic on a CPU)."""
        self.validate(input_ids.shape[-1], settings, sampling, mode)
        check_decode(decode)
        return Run(self, input_ids, settings, sampling, mode, interrupt, decode)

    def generate(self, prompt: str, settings: MergeSettings = MergeSettings(), sampling: Sampling = Sampling(),
                 mode: str = "cached", chat: bool = True) -> Trace:
        """Run to the end and return the trace."""
        run = self.start(self.encode(prompt, chat), settings, sampling, mode)
        for _ in run:
            pass
        return run.trace

    @torch.inference_mode()
    def warm_up(self) -> None:
        """One short forward pass, so the first timed run is not charged for one-time setup (kernels, allocator)."""
        ids = torch.zeros(1, 8, dtype=torch.long, device=self.device)
        self.prefill(ids, MergeSettings(cutoffs=(self.num_layers // 2,))).decode(0)
        self.sync()

