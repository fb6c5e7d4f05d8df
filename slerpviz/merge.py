"""Merge maths: which tokens become one slot, and how two hidden states become one.

Nothing here knows about models. Every function is a small pure function over tensors, so the engine can
execute a plan and the plots can draw the very same plan.

A plan describes one merge stage over a sequence of `length` items (tokens, or slots of an earlier stage). Each
output slot is written as an interpolation of two rows `a_index`, `b_index` at weight `t`. A slot that keeps a
single item interpolates it with a zero row (index `length`) at t = 0 or t = 1, which returns the item exactly for
every method. That one layout is the article's own (it padded with zero vectors), so `seed-2024` is reproduced
faithfully, including its whole-tensor norm, and the engine has a single vectorised code path for all methods.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from . import inputs

METHODS = ("slerp", "lerp", "slerp-dir", "seed-2024")
CHOICES = ("consecutive", "uniform", "similar", "attention")
# Choices planned from the hidden states at each cutoff, so only a running model can plan them.
PLANNED_AT_CUTOFF = ("similar", "attention")
POSITION_MODES = ("mean", "first", "renumber")

# |cos| above this and SLERP's sin(theta) denominator loses precision; plain interpolation is then accurate.
PARALLEL_COS = 0.9995
_EPS = 1e-12


# --------------------------------------------------------------------------------------------------------------------
# Interpolation of two vectors
# --------------------------------------------------------------------------------------------------------------------


def _as_weight(t: float | torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """t as a float32 tensor broadcastable against [..., d] (a scalar, or one value per vector)."""
    t = torch.as_tensor(t, dtype=torch.float32, device=like.device)
    return t.unsqueeze(-1) if t.dim() > 0 else t


def lerp(a: torch.Tensor, b: torch.Tensor, t: float | torch.Tensor = 0.5) -> torch.Tensor:
    """(1 - t)·a + t·b per vector, in float32, cast back. At t = 0.5 this is the plain mean."""
    w = _as_weight(t, a)
    return ((1 - w) * a.float() + w * b.float()).to(a.dtype)


def slerp(a: torch.Tensor, b: torch.Tensor, t: float | torch.Tensor = 0.5) -> torch.Tensor:
    """Spherical linear interpolation per vector over the last dimension.

    The angle comes from the normalised vectors; the weights sin((1-t)θ)/sin θ and sin(tθ)/sin θ are applied to
    the vectors as they are, so at t = 0.5 the result is the mean scaled by 1/cos(θ/2). Nearly parallel or
    opposite vectors (|cos θ| > 0.9995) and zero vectors fall back to linear interpolation: no NaN anywhere.
    """
    a32, b32 = a.float(), b.float()
    w = _as_weight(t, a)
    norm_a = a32.norm(dim=-1, keepdim=True)
    norm_b = b32.norm(dim=-1, keepdim=True)
    cos = ((a32 * b32).sum(-1, keepdim=True) / (norm_a * norm_b).clamp_min(_EPS)).clamp(-1.0, 1.0)
    linear = (cos.abs() > PARALLEL_COS) | (norm_a <= _EPS) | (norm_b <= _EPS)
    theta = torch.acos(cos)
    sin_theta = torch.where(linear, torch.ones_like(theta), torch.sin(theta))
    weight_a = torch.where(linear, 1 - w, torch.sin((1 - w) * theta) / sin_theta)
    weight_b = torch.where(linear, w.expand_as(theta), torch.sin(w * theta) / sin_theta)
    return (weight_a * a32 + weight_b * b32).to(a.dtype)


def slerp_dir(a: torch.Tensor, b: torch.Tensor, t: float | torch.Tensor = 0.5) -> torch.Tensor:
    """SLERP of the directions on the unit sphere, given the interpolated norm (1 - t)·|a| + t·|b|.

    Plain SLERP at t = 0.5 inflates the mean by 1/cos(θ/2); this keeps the direction and the average size.
    The endpoints t = 0 and t = 1 return a and b exactly.
    """
    a32, b32 = a.float(), b.float()
    w = _as_weight(t, a)
    norm_a = a32.norm(dim=-1, keepdim=True)
    norm_b = b32.norm(dim=-1, keepdim=True)
    direction = slerp(a32 / norm_a.clamp_min(_EPS), b32 / norm_b.clamp_min(_EPS), t)
    mixed = direction * ((1 - w) * norm_a + w * norm_b)
    return torch.where(w == 0, a32, torch.where(w == 1, b32, mixed)).to(a.dtype)


def seed2024(a: torch.Tensor, b: torch.Tensor, t: float | torch.Tensor) -> torch.Tensor:
    """What the April 2024 article's code computed, for all pairs of a sequence at once.

    `a` and `b` hold every first and every second member, [..., pairs, d]. Each of the two tensors is divided by
    its single Frobenius norm over (pairs, d), not per vector, so the per-pair "cosine" is tiny, θ ≈ π/2 and both
    weights come out near sin(π/4)/sin(π/2) ≈ 0.707: the result is about (a + b)/√2, not a SLERP.
    """
    a32, b32 = a.float(), b.float()
    w = _as_weight(t, a)
    a_unit = a32 / a32.norm(dim=(-2, -1), keepdim=True).clamp_min(_EPS)
    b_unit = b32 / b32.norm(dim=(-2, -1), keepdim=True).clamp_min(_EPS)
    theta = torch.acos((a_unit * b_unit).sum(-1, keepdim=True).clamp(-1.0, 1.0))
    sin_theta = torch.sin(theta)
    return (torch.sin((1 - w) * theta) / sin_theta * a32 + torch.sin(w * theta) / sin_theta * b32).to(a.dtype)


INTERPOLATE = {"slerp": slerp, "lerp": lerp, "slerp-dir": slerp_dir, "seed-2024": seed2024}


def check_method(method) -> str:
    """The merge method, checked. This check and the two below take any value, not only text: the page and the
    command line check their raw input with them, as the engine checks its settings."""
    return inputs.one_of(method, "merge method", METHODS)


def check_positions(mode) -> str:
    return inputs.one_of(mode, "positions mode", POSITION_MODES)


def check_choice(choice) -> str:
    return inputs.one_of(choice, "pair choice", CHOICES)


def cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine similarity per vector over the last dimension, float32, 0 for zero vectors."""
    a32, b32 = a.float(), b.float()
    return (a32 * b32).sum(-1) / (a32.norm(dim=-1) * b32.norm(dim=-1)).clamp_min(_EPS)


# --------------------------------------------------------------------------------------------------------------------
# The plan: which items become one slot
# --------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class MergePlan:
    """One merge stage over `length` items, as data.

    Slot i covers the consecutive items starts[i] .. starts[i] + sizes[i] - 1 (sizes are 1 or 2) and is computed
    as interpolate(x[a_index[i]], x[b_index[i]], t[i]), where index `length` stands for a zero row.
    """

    length: int
    keep_start: int
    keep_end: int
    starts: torch.Tensor  # long [slots]
    sizes: torch.Tensor  # long [slots]
    a_index: torch.Tensor  # long [slots]
    b_index: torch.Tensor  # long [slots]
    t: torch.Tensor  # float32 [slots]
    protected: torch.Tensor  # bool [slots]: inside a protected span

    @property
    def merged_length(self) -> int:
        return int(self.starts.numel())

    @property
    def pair_slots(self) -> torch.Tensor:
        """Indices of the slots that merge two items."""
        return torch.nonzero(self.sizes == 2).flatten()

    @property
    def groups(self) -> list[tuple[int, ...]]:
        """The items of each slot, in order: [(0,), (1, 2), (3, 4), (5,)] for example."""
        return [tuple(range(s, s + z)) for s, z in zip(self.starts.tolist(), self.sizes.tolist())]


def merged_length(length: int, keep_start: int = 0, keep_end: int = 0) -> int:
    """Number of slots `plan_merge` produces, in closed form."""
    lead, tail = max(keep_start, 1), max(keep_end, 1)
    middle = max(length - lead - tail, 0)
    return length - middle // 2


def check_spans(length: int, keep_start: int, keep_end: int) -> None:
    if keep_start < 0 or keep_end < 0:
        raise ValueError(f"protected spans must not be negative (keep_start={keep_start}, keep_end={keep_end})")
    if keep_start + keep_end > length:
        raise ValueError(
            f"protected spans keep_start={keep_start} + keep_end={keep_end} are longer than the prompt "
            f"({length} tokens)"
        )


def _middle(length: int, keep_start: int, keep_end: int) -> tuple[int, int]:
    """The items that may merge: [lead, end), after the protected start and first item, before the protected end
    and last item."""
    lead = min(max(keep_start, 1), length)
    return lead, max(length - max(keep_end, 1), lead)


def check_ratio(ratio: float) -> None:
    if not 0 <= ratio <= 1:
        raise ValueError(f"merge ratio {ratio!r} must be between 0 and 1 (the share of eligible pairs merged)")


def choose_pairs(
    length: int, keep_start: int = 0, keep_end: int = 0, ratio: float = 1.0, choice: str = "consecutive",
    similarity: torch.Tensor | None = None, attention: torch.Tensor | None = None, keep_top: int = 0,
    cosine_share: float = 0.0, reach: int = 0,
) -> torch.Tensor:
    """First items of the pairs (i, i + 1) to merge, sorted, never overlapping, never protected, first or last.

    The eligible pairs are the consecutive pairs of the middle, (lead, lead+1), (lead+2, lead+3), ...; `ratio` of
    them are merged: the first ones (`consecutive`), spread evenly (`uniform`), for `similar` the most similar
    adjacent pairs by `similarity` [length - 1], the cosine of items i and i + 1, at any offset, and for
    `attention` the least-attended eligible pairs by `attention` [length] (see least_attended_pairs; with
    `reach` > 0 a pair ranks with the most attended item within reach, with `cosine_share` > 0 its ranking also
    weighs how alike the pair is, by `similarity`).
    """
    check_spans(length, keep_start, keep_end)
    check_ratio(ratio)
    check_choice(choice)
    lead, end = _middle(length, keep_start, keep_end)
    grid = torch.arange(lead, max(end - 1, lead), 2)
    count = math.floor(ratio * grid.numel() + 0.5)
    if choice == "consecutive":
        return grid[:count]
    if choice == "uniform":
        return grid[((torch.arange(count) + 0.5) * grid.numel() / max(count, 1)).long()]
    if choice == "attention":
        if attention is None:
            raise ValueError("the 'attention' pair choice needs the attention each item receives")
        if cosine_share > 0 and similarity is None:
            raise ValueError("mixing the cosine into the 'attention' pair choice needs the adjacent similarities")
        return least_attended_pairs(attention, grid, count, keep_top, similarity if cosine_share > 0 else None,
                                    cosine_share, reach)
    if similarity is None:
        raise ValueError("the 'similar' pair choice needs the similarity of adjacent hidden states")
    return most_similar_pairs(similarity, lead, end, count)


def least_attended_pairs(attention: torch.Tensor, grid: torch.Tensor, count: int, keep_top: int = 0,
                         similarity: torch.Tensor | None = None, cosine_share: float = 0.0,
                         reach: int = 0) -> torch.Tensor:
    """The `count` pairs of the grid (i, i + 1 for i in grid) whose more-attended member receives the least
    attention; a pair holding one of the `keep_top` most-attended items never merges (so fewer may merge).

    A pair is scored by its maximum, not its sum: one token the prompt looks at is reason enough to keep a pair.
    With `reach` R > 0 the pairs rank by the spread attention (spread_attention), so the items around an attended
    one stay too, but the `keep_top` items are still the most attended themselves: ranked by the spread score, the
    budget would go to the plateaus (2R + 1 wide) around the few highest peaks instead of to `keep_top` places.
    With `similarity` [length - 1] (the cosine of items i and i + 1) and `cosine_share` s, pairs are ranked by
    (1 - s) * their rank by attention + s * their rank by dissimilarity: ranks, because an attention weight and a
    cosine have no common scale. Ties go to the earlier pair, so the result is deterministic.
    """
    scores = attention.detach().float().cpu()
    if grid.numel() == 0 or count <= 0:
        return grid[:0]
    ranked = spread_attention(scores, reach)
    pair_score = torch.maximum(ranked[grid], ranked[grid + 1])
    if keep_top > 0:
        kept = torch.zeros(scores.numel(), dtype=torch.bool)
        kept[scores.topk(min(keep_top, scores.numel())).indices] = True
        allowed = ~(kept[grid] | kept[grid + 1])
        grid, pair_score = grid[allowed], pair_score[allowed]
    if similarity is not None and cosine_share > 0 and grid.numel() > 0:
        unlike = 1 - similarity.detach().float().cpu()[grid]
        pair_score = (1 - cosine_share) * share_ranks(pair_score) + cosine_share * share_ranks(unlike)
    order = torch.sort(pair_score, stable=True).indices[:count]
    return grid[order].sort().values


def spread_attention(attention: torch.Tensor, reach: int) -> torch.Tensor:
    """Each item's attention raised to the largest within `reach` items on either side: a max-pool of width
    2 * reach + 1, as SnapKV clusters what its window attends to. The words around a token the prompt looks at then
    rank with it, so a fact stays whole rather than only its most-attended token."""
    if reach <= 0:
        return attention
    return F.max_pool1d(attention.float()[None, None], 2 * reach + 1, stride=1, padding=reach)[0, 0]


def share_ranks(values: torch.Tensor) -> torch.Tensor:
    """Each value's rank among `values` as a share in [0, 1] (0 for the smallest; ties by order)."""
    ranks = torch.empty(values.numel())
    ranks[torch.sort(values, stable=True).indices] = torch.arange(values.numel(), dtype=torch.float)
    return ranks / max(values.numel() - 1, 1)


def most_similar_pairs(similarity: torch.Tensor, lead: int, end: int, count: int) -> torch.Tensor:
    """Greedy non-overlapping matching of adjacent pairs by similarity, then the `count` most similar of it.

    Greedy (take the most similar pair, drop its two neighbours, repeat) is computed in rounds: every pair that is a
    local maximum among the pairs still open is one greedy would take, so each round takes them all at once. Ties
    go to the earlier pair, so the result is deterministic. A greedy matching holds at least a third of the middle;
    when `count` asks for more, fewer pairs are merged.
    """
    score = torch.full((similarity.numel(),), -math.inf)
    if end - lead >= 2:
        score[lead : end - 1] = similarity.detach().float().cpu()[lead : end - 1]
    chosen = torch.zeros_like(score, dtype=torch.bool)
    while True:
        left = torch.nn.functional.pad(score[:-1], (1, 0), value=-math.inf)
        right = torch.nn.functional.pad(score[1:], (0, 1), value=-math.inf)
        take = (score > left) & (score >= right) & torch.isfinite(score)
        if not take.any():
            break
        chosen |= take
        closed = take.clone()
        closed[1:] |= take[:-1]
        closed[:-1] |= take[1:]
        score = score.masked_fill(closed, -math.inf)
    starts = torch.nonzero(chosen).flatten()
    if starts.numel() > count:
        order = torch.sort(similarity.detach().float().cpu()[starts], descending=True, stable=True).indices
        starts = starts[order[:count]].sort().values
    return starts


def plan_from_pairs(
    length: int, pair_starts: torch.Tensor, keep_start: int = 0, keep_end: int = 0,
    weights: torch.Tensor | None = None,
) -> MergePlan:
    """The plan that merges items (i, i + 1) for each i in pair_starts and keeps every other item alone.

    `weights` (tokens held by each item, default 1) set t = w_b / (w_a + w_b), so a slot holding two tokens meeting
    a single one weighs 2:1.
    """
    is_pair_start = torch.zeros(length, dtype=torch.bool)
    is_pair_start[pair_starts] = True
    is_second = torch.zeros(length, dtype=torch.bool)
    is_second[pair_starts + 1] = True
    starts = torch.nonzero(~is_second).flatten()
    pair = is_pair_start[starts]
    sizes = 1 + pair.long()
    # Singles before the first pair sit as (zero, x) at t = 1, the others as (x, zero) at t = 0: the article's
    # layout, with index `length` standing for the zero row.
    first_pair = int(pair_starts.min()) if pair_starts.numel() else length
    before = ~pair & (starts < first_pair)
    zero = torch.full_like(starts, length)
    second = (starts + 1).clamp(max=length - 1)
    a_index = torch.where(before, zero, starts)
    b_index = torch.where(pair, second, torch.where(before, starts, zero))
    w = torch.ones(length) if weights is None else weights.float().cpu()
    t_pair = w[second] / (w[starts] + w[second])
    t = torch.where(pair, t_pair, before.float())
    slot_index = torch.arange(starts.numel())
    protected = (slot_index < keep_start) | (slot_index >= starts.numel() - keep_end)
    return MergePlan(length, keep_start, keep_end, starts, sizes, a_index, b_index, t, protected)


def plan_merge(
    length: int, keep_start: int = 0, keep_end: int = 0, ratio: float = 1.0, choice: str = "consecutive",
    similarity: torch.Tensor | None = None, weights: torch.Tensor | None = None,
    attention: torch.Tensor | None = None, keep_top: int = 0, cosine_share: float = 0.0, reach: int = 0,
) -> MergePlan:
    """Pair consecutive items, except the protected spans and the first and last item, which stay alone.

    By default the whole unprotected middle is cut into consecutive pairs; when it has odd length its last item
    stays alone. `ratio` and `choice` merge only some of the pairs (see choose_pairs).
    """
    pairs = choose_pairs(length, keep_start, keep_end, ratio, choice, similarity, attention, keep_top, cosine_share,
                         reach)
    return plan_from_pairs(length, pairs, keep_start, keep_end, weights)


def apply_plan(x: torch.Tensor, plan: MergePlan, method: str = "slerp") -> torch.Tensor:
    """Merge x [batch, length, d] into [batch, slots, d]: one gather and one batched interpolation."""
    check_method(method)
    padded = torch.cat([x, x.new_zeros(x.shape[0], 1, x.shape[-1])], dim=1)
    device = x.device
    a = padded.index_select(1, plan.a_index.to(device))
    b = padded.index_select(1, plan.b_index.to(device))
    return INTERPOLATE[method](a, b, plan.t.to(device))


def adjacent_cosines(x: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of every item with the next one, x [batch, length, d] -> [batch, length - 1]."""
    return cosine(x[:, :-1], x[:, 1:])


def pair_cosines(x: torch.Tensor, plan: MergePlan) -> torch.Tensor:
    """Cosine similarity of the two members of each merged pair of x [batch, length, d]: [batch, pairs]."""
    first = plan.starts[plan.pair_slots].to(x.device)
    return cosine(x.index_select(1, first), x.index_select(1, first + 1))


# --------------------------------------------------------------------------------------------------------------------
# Several stages, and where a slot sits
# --------------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Stage:
    """A merge stage at a decoder layer, with the span of original tokens [first, last] each slot covers."""

    cutoff: int
    plan: MergePlan
    first: torch.Tensor  # long [slots]: first original token of each slot
    last: torch.Tensor  # long [slots]: last original token of each slot

    @property
    def sizes(self) -> torch.Tensor:
        """Original tokens held by each slot."""
        return self.last - self.first + 1

    @property
    def groups(self) -> list[tuple[int, ...]]:
        """Original token positions of each slot after this stage."""
        return [tuple(range(f, l + 1)) for f, l in zip(self.first.tolist(), self.last.tolist())]


def next_stage(
    first: torch.Tensor, last: torch.Tensor, cutoff: int, keep_start: int = 0, keep_end: int = 0, ratio: float = 1.0,
    choice: str = "consecutive", similarity: torch.Tensor | None = None, size_weighted: bool = True,
    attention: torch.Tensor | None = None, keep_top: int = 0, cosine_share: float = 0.0, reach: int = 0,
) -> Stage:
    """Merge the slots [first, last] of the stage before (or the tokens) once more.

    Protected tokens are singles at both ends of every stage, so the same keep_start / keep_end counted in slots
    protect the same original tokens at every stage.
    """
    weights = (last - first + 1) if size_weighted else None
    plan = plan_merge(first.numel(), keep_start, keep_end, ratio, choice, similarity, weights, attention, keep_top,
                      cosine_share, reach)
    return Stage(cutoff, plan, first[plan.starts], last[plan.starts + plan.sizes - 1])


def ratio_per_stage(ratio: float | tuple[float, ...], stages: int) -> tuple[float, ...]:
    """One merge ratio per cutoff: a single number applies to all."""
    ratios = (ratio,) * stages if isinstance(ratio, (int, float)) else tuple(ratio)
    if len(ratios) != stages:
        raise ValueError(f"{len(ratios)} merge ratios for {stages} cutoffs: give one, or one per cutoff")
    for r in ratios:
        check_ratio(r)
    return ratios


def plan_stages(
    length: int, cutoffs: tuple[int, ...], keep_start: int = 0, keep_end: int = 0,
    ratio: float | tuple[float, ...] = 1.0, choice: str = "consecutive", size_weighted: bool = True,
) -> list[Stage]:
    """One plan per cutoff, each over the slots of the stage before; the spans compose to original tokens.

    The `similar` and `attention` choices depend on the hidden states at each cutoff, so only the engine can plan
    them.
    """
    check_spans(length, keep_start, keep_end)
    ratios = ratio_per_stage(ratio, len(cutoffs))
    first = last = torch.arange(length)
    stages = []
    for cutoff, stage_ratio in zip(sorted(cutoffs), ratios):
        stage = next_stage(first, last, cutoff, keep_start, keep_end, stage_ratio, choice, None, size_weighted)
        first, last = stage.first, stage.last
        stages.append(stage)
    return stages


def layer_lengths(length: int, stages: list[Stage], layers: int) -> list[int]:
    """Sequence length each decoder layer runs on: `length` until the first stage's cutoff, then each stage's."""
    lengths = [length] * layers
    for stage in stages:
        for layer in range(stage.cutoff, layers):
            lengths[layer] = stage.plan.merged_length
    return lengths


def slot_positions(first: torch.Tensor, last: torch.Tensor, mode: str = "mean") -> torch.Tensor:
    """RoPE position of each slot: the mean of its tokens' positions, its first token's, or 0..slots-1."""
    check_positions(mode)
    if mode == "mean":
        return (first + last).float() / 2
    if mode == "first":
        return first.float()
    return torch.arange(first.numel(), dtype=torch.float32)  # renumber
