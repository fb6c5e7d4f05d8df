"""Named merge settings, as data: the one place the recommended setting lives.

The app's "Recommended preset", the CLI's `--preset NAME`, the benchmarks' `--preset` / `--grid presets` and the
README all read this module. Cutoffs are written as shares of the model's depth, so one preset fits a 30-layer
SmolLM2 and a 32-layer Mistral alike.

How `recommended` and `fast` were chosen, and what they keep, is in docs/measurements.md ("Merge what the prompt
is not looking at", then "Reach", "The kept budget", "A kept budget that grows with the prompt" and "Where the
attention choice can see the answer"): tuned on assets/texts only and judged on assets/heldout, which no setting was
tuned on.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

from .settings import MergeSettings


@dataclass(frozen=True)
class Preset:
    """A named setting: what it does in words (`description`, and `summary`, one short line for the page's preset
    menu), where it cuts (each cutoff as a share of the model's depth) and how it merges: `merge`, a MergeSettings
    without cutoffs, holds every other field, so a field MergeSettings gains is a preset's too, with no line here."""

    description: str
    depth_shares: tuple[float, ...]  # each cutoff as a share of the number of layers
    merge: MergeSettings = MergeSettings()  # every merge setting but the cutoffs; per-cutoff ratios in shares' order
    summary: str = ""

    def __post_init__(self):
        if self.merge.cutoffs:
            raise ValueError("a preset's cutoffs are its depth shares, placed for each model's depth: its merge "
                             "settings hold none")

    def settings(self, num_layers: int) -> MergeSettings:
        """The template with its cutoffs placed for a model of `num_layers` layers."""
        # Each share rounded to a layer; where two shares round to the same layer (0.57 and 0.6 of 24 are both 14) the
        # larger takes the next layer (15), and any pushed past the last layer step back, so every share keeps a layer
        # of its own. A share written twice is one layer merged twice (groups of up to four tokens there), so equal
        # shares are placed once. Worked in depth order; each cutoff stays in its share's place, beside its ratio.
        shares = sorted(set(self.depth_shares))
        layers = []
        for share in shares:
            layer = max(1, min(num_layers, round(share * num_layers)))
            layers.append(max(layer, layers[-1] + 1) if layers else layer)
        for rank in reversed(range(len(layers))):
            layers[rank] = min(layers[rank], num_layers if rank == len(layers) - 1 else layers[rank + 1] - 1)
        if layers and layers[0] < 1:
            raise ValueError(f"a model of {num_layers} layers has no room for {len(layers)} distinct cutoffs")
        placed = dict(zip(shares, layers))
        cutoffs = tuple(placed[share] for share in self.depth_shares)
        return dataclasses.replace(self.merge, cutoffs=cutoffs)


def from_fields(description: str, depth_shares: tuple[float, ...], ratio: float | tuple[float, ...] = 1.0,
                choice: str = "consecutive", attention_window: int = MergeSettings.attention_window,
                attention_keep: int = MergeSettings.attention_keep, **fields) -> Preset:
    """A preset written as its shape and MergeSettings fields, the first four by position (ratio, choice, attention
    window, attention keep), as bench frontier's grids write their settings."""
    return Preset(description, tuple(depth_shares), MergeSettings(
        ratio=ratio, choice=choice, attention_window=attention_window, attention_keep=attention_keep, **fields))


PRESETS: dict[str, Preset] = {
    "recommended": Preset(
        description="merge the pairs the last 8 prompt tokens attend to least, never the most attended (32, or one "
                    "token in sixteen on prompts over 512) nor the last 32, each pair ranked with the most attended "
                    "token within 7 tokens of it: half of the pairs at 1/2 of the depth, then all that remain at 2/3 "
                    "(about 1.33x fewer prefill FLOPs; retrieval within a miss or two of the base from 512 to 2,048 "
                    "tokens on text it was not tuned on)",
        depth_shares=(0.5, 0.67),
        # keep_recent (seventeenth pass): the last 32 tokens unmerged lowered KL(base ‖ merged) in 559 of 696 tuning
        # windows of six registers, for 0.003 to 0.011 of the FLOP limit from 512 to 2,048 tokens.
        merge=MergeSettings(ratio=(0.5, 1.0), choice="attention", attention_window=8, attention_keep=32,
                            attention_reach=7, attention_keep_share=1 / 16, keep_recent=32),
        summary="about 1.33x fewer prefill FLOPs; retrieval within a miss or two of the base",
    ),
    # Its cutoffs sit where the last prompt tokens' attention finds a retrieval needle (python -m slerpviz.bench
    # locate): on SmolLM2 it ranks the needle near the top from layer 14 on, except at layer 16, where an earlier
    # shape (0.5, 0.53, 0.6, 0.67: layers 15, 16, 18, 20) merged and lost answers.
    "fast": Preset(
        description="toward 1.5x: the same attention choice, budget, reach and last 32 tokens kept, half the pairs "
                    "at 0.47 of the depth, half of the rest at 0.57 and at 0.6, then all at 2/3 (about 1.5x fewer "
                    "prefill FLOPs; chosen where the prompt's attention finds a retrieval answer)",
        depth_shares=(0.47, 0.57, 0.6, 0.67),
        merge=MergeSettings(ratio=(0.5, 0.5, 0.5, 1.0), choice="attention", attention_window=8, attention_keep=32,
                            attention_reach=7, attention_keep_share=1 / 16, keep_recent=32),
        summary="about 1.5x fewer prefill FLOPs; retrieval within a miss or two of the base",
    ),
    # Chosen on the tuning texts (docs/measurements.md, twelfth pass): the best next-token agreement of the shapes
    # that reach a FLOP limit of 2 at 1,024 tokens. On SmolLM2 the first 14 of 30 layers already cost 0.47 of the
    # prefill, so 2x needs a deep cut by layer 12, before the prompt's attention finds a retrieval answer (layer 14,
    # `bench locate`): every such shape lost nearly every pass key and multi-key answer, merged or dropped alike.
    "turbo": Preset(
        description="2x fewer prefill FLOPs, with groups: four in five of the pairs the prompt attends to least, "
                    "merged in three rounds at 0.4 of the depth (runs of up to eight tokens), three more at 0.47 and "
                    "one at 0.57, with the recommended budget and reach. It shows what 2x costs on a small model: "
                    "next-token agreement near 0.8, and nearly every pass key and multi-key answer lost",
        depth_shares=(0.4, 0.4, 0.4, 0.47, 0.47, 0.47, 0.57),
        merge=MergeSettings(ratio=0.8, choice="attention", attention_window=8, attention_keep=32,
                            attention_reach=7, attention_keep_share=1 / 16),
        summary="about 2x fewer prefill FLOPs, merging groups; loses retrieval answers: what 2x costs",
    ),
    "careful": Preset(
        description="closest to the base model's next token: the recommended shape merged later, half the pairs "
                    "at 0.6 of the depth and the rest at 0.73, with a fixed budget of 32 and without the reach "
                    "(about 1.25x fewer prefill FLOPs)",
        depth_shares=(0.6, 0.73),
        merge=MergeSettings(ratio=(0.5, 1.0), choice="attention", attention_window=8, attention_keep=32),
        summary="about 1.25x fewer prefill FLOPs; closest to the base model's next token",
    ),
    "article": Preset(
        description="the April 2024 article: every consecutive pair at half the depth",
        depth_shares=(0.5,), merge=MergeSettings(ratio=1.0, choice="consecutive"),
        summary="every pair at half the depth, as the article did; loses the pass key every time",
    ),
}


def preset(name: str, num_layers: int) -> MergeSettings:
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return PRESETS[name].settings(num_layers)


def recommended(num_layers: int) -> MergeSettings:
    """The recommended setting for a model of `num_layers` decoder layers."""
    return preset("recommended", num_layers)
