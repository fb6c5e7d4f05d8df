"""The grids the frontier benchmark measures: `default` (cutoff × merge ratio × pair choice), `attention` and the
later passes of the attention-guided exploration (ATTENTION_PASSES), and `presets`.

Every grid places its cutoffs at shares of the model's depth, so it fits any model. `python -m slerpviz.bench
frontier --grid NAME` runs one (slerpviz.bench.frontier).
"""

from __future__ import annotations

import dataclasses

from ..engine import MergeSettings


def default_grid(num_layers: int, quick: bool, method: str = "slerp", positions: str = "mean",
                 ) -> tuple[MergeSettings, ...]:
    """Cutoffs at fixed shares of the depth × ratios × {consecutive, uniform, similar, similar + proportional}."""
    shares = (0.25, 0.5) if quick else (0.07, 0.14, 0.25, 0.37, 0.5, 0.75)
    ratios = (0.5, 1.0) if quick else (0.25, 0.5, 0.75, 1.0)
    variants = (("consecutive", False), ("similar", True)) if quick else (
        ("consecutive", False), ("uniform", False), ("similar", False), ("similar", True))
    cutoffs = sorted({max(1, round(share * num_layers)) for share in shares})
    return tuple(
        MergeSettings(cutoffs=(cutoff,), method=method, positions=positions, ratio=ratio, choice=choice,
                      proportional=proportional)
        for cutoff in cutoffs for ratio in ratios for choice, proportional in variants
    )


def attention_grid(num_layers: int, quick: bool, method: str = "slerp", positions: str = "mean",
                   ) -> tuple[MergeSettings, ...]:
    """The exploration around attention-guided merging, as run for docs/measurements.md: merge a little early and
    more later (pyramids of cutoffs), the window W, a budget of most-attended tokens kept; the consecutive choice
    beside the main shapes for comparison. Cutoffs are shares of the depth (on 30 layers: 0.33 -> 10, 0.4 -> 12,
    0.5 -> 15, 0.67 -> 20, 0.73 -> 22, 0.83 -> 25), so the grid fits any model.

    A first pass (pass key only, n = 20 at 1,024 tokens) chose its shape: merging every pair at half the depth loses
    the key whatever the choice (0-2/20), even keeping the 64 most-attended tokens; merging half of them, the least
    attended by the last 8 tokens, keeps it (17/20, base 18/20); W = 8 beat W = 32 there (17 against 14), and
    protecting the last 16 tokens changed nothing (17/20). Reproduce one with `python -m slerpviz.bench retrieval
    --tasks passkey --lengths 1024 --cutoffs 15 --ratio 0.5 --choice attention --attention-window 8`."""
    def at(share: float) -> int:
        return max(1, round(share * num_layers))

    def make(cutoffs, ratio, choice="attention", attention_window=8, attention_keep=0, **extra) -> MergeSettings:
        return MergeSettings(cutoffs=tuple(at(c) for c in cutoffs), ratio=ratio, choice=choice, method=method,
                             positions=positions, attention_window=attention_window, attention_keep=attention_keep,
                             **extra)

    if quick:
        return (make((0.5,), 0.5), make((0.5,), 0.5, "consecutive"), make((0.25, 0.5), (0.5, 1.0), attention_keep=8))
    pyramid = ((0.4, 0.67), (0.5, 1.0))
    grid = [
        make((0.5,), 0.5), make((0.5,), 0.5, "consecutive"), make((0.5,), 1.0, "consecutive"), make((0.67,), 1.0),
        make((0.5, 0.67), (0.5, 1.0)), make(*pyramid), make(*pyramid, attention_window=32),
        make(*pyramid, attention_keep=16), make(*pyramid, choice="consecutive"),
        make((0.33, 0.5, 0.67), (0.5, 0.75, 1.0)),
    ]
    return tuple(dict.fromkeys(grid))  # shares may round to the same layer on shallow models


# The attention-guided exploration's later passes, as data: each setting is (cutoffs as shares of the depth, ratio
# per cutoff, most-attended tokens kept[, other MergeSettings fields]), with the attention choice and W = 8; the first
# entry of each is its --quick grid. What each pass learnt from the one before (n = 72 top-1, n = 20 pass key at
# 1,024 tokens, tuning texts):
RECOMMENDED_SHAPE = ((0.5, 0.67), (0.5, 1.0), 32)
FAST_SHAPE = ((0.5, 0.53, 0.6, 0.67), (0.5, 0.5, 0.5, 1.0), 32)  # `fast` until the tenth pass moved its cutoffs
LOCATED_SHAPE = ((0.47, 0.57, 0.6, 0.67), (0.5, 0.5, 0.5, 1.0), 32)  # `fast` since the tenth pass
GROWING = {"attention_reach": 7, "attention_keep_share": 1 / 16}  # the reach and growing budget of the presets
ATTENTION_PASSES: dict[str, list[tuple]] = {
    # 2nd: keeping the 16 most-attended tokens lifted top-1 at 12+20 (0.764 -> 0.889) and 15+20 kept the pass key
    # (17/20): combine the two, and try a larger budget.
    "budget": [((0.5, 0.67), (0.5, 1.0), 4),
               ((0.5, 0.67), (0.5, 1.0), 16), ((0.5, 0.67), (0.5, 1.0), 32), ((0.4, 0.67), (0.5, 1.0), 32)],
    # 3rd, toward 1.5x: half the pairs at 1/2 kept the key (15+20: 18/20), beginning at 12 did not (14/20), so keep
    # the half-merge at 1/2 (or just before) and shorten further later on; the recommended setting beside them.
    "stretch": [((0.5, 0.6, 0.7), (0.5, 1.0, 1.0), 4),
                ((0.5, 0.67), (0.5, 1.0), 32), ((0.5, 0.6, 0.7), (0.5, 1.0, 1.0), 32),
                ((0.5, 0.6, 0.7), (0.5, 1.0, 1.0), 64), ((0.47, 0.6, 0.73), (0.5, 1.0, 1.0), 32),
                ((0.4, 0.53, 0.67), (0.5, 0.5, 1.0), 32), ((0.43, 0.57), (0.75, 1.0), 32)],
    # 4th: a second merge of every pair lost the key (15+18+21: 2-3/20), halving twice then all (12+16+20) kept
    # 14/20 at 1.52x, so halve at every stage.
    "pyramid": [((0.4, 0.5, 0.6, 0.7), (0.5,) * 4, 4),
                ((0.4, 0.5, 0.6, 0.7), (0.5,) * 4, 32), ((0.43, 0.5, 0.57, 0.63), (0.5,) * 4, 32),
                ((0.4, 0.47, 0.53, 0.6), (0.5,) * 4, 32), ((0.4, 0.53, 0.67, 0.8), (0.5, 0.5, 0.5, 1.0), 32),
                ((0.4, 0.53, 0.67), (0.5, 0.5, 1.0), 64)],
    # 5th: beginning at layer 12 or 13 kept at most 14/20, so begin at 1/2 of the depth and halve in quick steps.
    "late": [((0.5, 0.53, 0.57), (0.5, 0.5, 1.0), 4),
             ((0.5, 0.57, 0.63, 0.7), (0.5, 0.5, 0.5, 1.0), 32), ((0.5, 0.53, 0.57, 0.6, 0.63), (0.5,) * 5, 32),
             ((0.5, 0.53, 0.6, 0.67), (0.5, 0.5, 0.5, 1.0), 32), ((0.5, 0.53, 0.57), (0.5, 0.5, 1.0), 32),
             ((0.47, 0.53, 0.6, 0.67), (0.5, 0.5, 0.5, 1.0), 32)],
    # 6th: the recommended shape (15+20 of 30) with each remaining lever of the issue turned one at a time: a mix of
    # the attention ranking with the pair's cosine, proportional attention, where slots sit (positions), a protected
    # recent window, and lerp for slerp (at t = 0.5 they differ only in norm).
    "variants": [(*RECOMMENDED_SHAPE, {"cosine_share": 0.5}),
                 RECOMMENDED_SHAPE, (*RECOMMENDED_SHAPE, {"cosine_share": 0.25}),
                 (*RECOMMENDED_SHAPE, {"cosine_share": 0.5}), (*RECOMMENDED_SHAPE, {"proportional": True}),
                 (*RECOMMENDED_SHAPE, {"positions": "first"}), (*RECOMMENDED_SHAPE, {"keep_end": 16}),
                 (*RECOMMENDED_SHAPE, {"keep_end": 64}), (*RECOMMENDED_SHAPE, {"method": "lerp"})],
    # 7th: at 1.5x (the fast shape) the pass key and the multi-key answer were lost; ranking each token with the most
    # attended within a reach of it (SnapKV's pooling) kept them in a retrieval run (n = 20 per length,
    # docs/measurements.md "Reach"): reach 4 and 7 against none, on both shapes, for top-1 too. Run again once the
    # reach ranked only the pairs and the kept budget went back to the most-attended tokens themselves
    # (docs/measurements.md, "The kept budget").
    "reach": [(*FAST_SHAPE, {"attention_reach": 7}),
              FAST_SHAPE, (*FAST_SHAPE, {"attention_reach": 4}), (*FAST_SHAPE, {"attention_reach": 7}),
              RECOMMENDED_SHAPE, (*RECOMMENDED_SHAPE, {"attention_reach": 7})],
    # 8th: with the reach, a fixed budget of 32 kept tokens lost some multi-key answers at 2,048 tokens that 128 kept
    # (docs/measurements.md, "The kept budget"): a budget that grows with the prompt, one token in sixteen (32 at
    # 512, 128 at 2,048), on both shapes. It changes nothing below 512 tokens, so measure top-1 on prefixes of 1,024
    # or more.
    "share": [(*RECOMMENDED_SHAPE, {"attention_reach": 7, "attention_keep_share": 1 / 16}),
              (*RECOMMENDED_SHAPE, {"attention_reach": 7}),
              (*RECOMMENDED_SHAPE, {"attention_reach": 7, "attention_keep_share": 1 / 16}),
              (*FAST_SHAPE, {"attention_reach": 7}),
              (*FAST_SHAPE, {"attention_reach": 7, "attention_keep_share": 1 / 16})],
    # 12th (issue 24), toward 2x with groups: a share written twice merges twice at its layer (runs of up to four
    # tokens, eight at three rounds). On SmolLM2 the first 14 of 30 layers alone cost 0.47 of the prefill, so a FLOP
    # limit of 2.0 needs a deep cut by layer 12 already. Retrieval on the tuning texts (n = 20 per task, 1,024
    # tokens) lost nearly every answer with each of these shapes (0-2 of 20, the base 18 and 17): this pass picks,
    # by next-token agreement, the best of them to show what 2x costs. `fast` (1.5x) beside them.
    "groups": [((0.4, 0.4, 0.47, 0.47), (1.0,) * 4, 32, GROWING),
               (*LOCATED_SHAPE, GROWING),
               ((0.4, 0.4, 0.47, 0.47), (1.0,) * 4, 32, GROWING),
               ((0.4, 0.4, 0.47, 0.47, 0.57), (0.5, 1.0, 1.0, 1.0, 1.0), 32, GROWING),
               ((0.4, 0.4, 0.47, 0.47, 0.47, 0.57), (0.75, 0.75, 0.9, 0.9, 0.9, 0.9), 32, GROWING),
               ((0.4, 0.4, 0.4, 0.47, 0.47, 0.47), (0.9,) * 6, 32, GROWING),
               ((0.4, 0.4, 0.4, 0.47, 0.47, 0.47, 0.57), (0.8,) * 7, 32, GROWING),
               ((0.33, 0.33, 0.47, 0.47, 0.57), (0.5, 0.5, 1.0, 1.0, 1.0), 32, GROWING),
               ((0.37, 0.37, 0.47, 0.47, 0.57), (1.0, 0.5, 1.0, 1.0, 1.0), 32, GROWING)],
    # 12th, SLERP for k vectors: the shape of the largest groups above (every pair twice at 0.4 and twice at 0.47:
    # runs of up to sixteen tokens), one run per --method, so the interpolations meet on the same windows.
    "group-methods": [((0.4, 0.4, 0.47, 0.47), (1.0,) * 4, 32, GROWING)] * 2,
    # 12th, the registers: `recommended` missed top-1 0.85 on lists (0.828) and met it narrowly on dialogue (0.859),
    # n = 64 each. Its levers one at a time, on those two registers: a protected recent window, the cosine mix, a
    # wider attention window, fewer pairs at the first cut, the shape a little later.
    "registers": [(*RECOMMENDED_SHAPE, GROWING),
                  (*RECOMMENDED_SHAPE, GROWING), (*RECOMMENDED_SHAPE, {**GROWING, "keep_end": 16}),
                  (*RECOMMENDED_SHAPE, {**GROWING, "cosine_share": 0.25}),
                  (*RECOMMENDED_SHAPE, {**GROWING, "attention_window": 16}),
                  ((0.5, 0.67), (0.4, 1.0), 32, GROWING), ((0.53, 0.7), (0.5, 1.0), 32, GROWING)],
    # 17th, the recent window: recommended as the 16th pass left it, with its last 16 or 32 prompt tokens never
    # merged, and fewer pairs at the first cut (a control at about the FLOP limit of 32 kept from 256 tokens on).
    "recent": [(*RECOMMENDED_SHAPE, GROWING),
               (*RECOMMENDED_SHAPE, GROWING), (*RECOMMENDED_SHAPE, {**GROWING, "keep_recent": 16}),
               (*RECOMMENDED_SHAPE, {**GROWING, "keep_recent": 32}), ((0.5, 0.67), (0.45, 1.0), 32, GROWING)],
    # 17th, the same window on `fast` as the tenth pass left it.
    "recent-fast": [(*LOCATED_SHAPE, GROWING), (*LOCATED_SHAPE, GROWING),
                    (*LOCATED_SHAPE, {**GROWING, "keep_recent": 32})],
}


def attention_pass(name: str, num_layers: int, quick: bool, method: str = "slerp", positions: str = "mean",
                   ) -> tuple[MergeSettings, ...]:
    """One of ATTENTION_PASSES as settings for a model of `num_layers` layers (cutoffs placed as presets place them)."""
    from ..presets import from_fields

    entries = ATTENTION_PASSES[name][:1] if quick else ATTENTION_PASSES[name][1:]
    return tuple(dict.fromkeys(
        dataclasses.replace(from_fields(name, shares, ratio, "attention", 8, keep).settings(num_layers),
                            **{"method": method, "positions": positions, **(extra[0] if extra else {})})
        for shares, ratio, keep, *extra in entries))


def beside_drop(settings: tuple[MergeSettings, ...], drop: bool = True) -> tuple[MergeSettings, ...]:
    """Each setting followed by its twin that drops the same pairs (each pair's first token kept where it sat)
    instead of merging them: the same lengths, so the frontier shows what merging buys. Settings that drop already,
    or weigh slots by proportional attention (a dropped pair holds one token), have no twin."""
    if not drop:
        return settings
    twins = (dataclasses.replace(s, method="drop", positions="first") for s in settings)
    return tuple(dict.fromkeys(member for setting, twin in zip(settings, twins)
                               for member in ((setting, twin) if not setting.proportional else (setting,))))


def named_grid(name: str, num_layers: int, quick: bool, method: str = "slerp", positions: str = "mean",
               ) -> tuple[MergeSettings, ...]:
    """`default` (cutoff × ratio × pair choice), `attention` and the passes of ATTENTION_PASSES (the attention-guided
    exploration, first to eighth pass) or `presets` (the named presets of slerpviz.presets)."""
    if name == "default":
        return default_grid(num_layers, quick, method, positions)
    if name == "attention":
        return attention_grid(num_layers, quick, method, positions)
    if name in ATTENTION_PASSES:
        return attention_pass(name, num_layers, quick, method, positions)
    if name == "presets":
        from ..presets import PRESETS, preset

        return tuple(preset(p, num_layers) for p in PRESETS)
    raise ValueError(f"unknown grid {name!r}; choose default, attention, {', '.join(ATTENTION_PASSES)} or presets")
