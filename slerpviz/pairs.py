"""Which items pair: the merge plan's making, and the stages of several cutoffs.

`plan_merge` pairs the unprotected middle of a sequence, all of it or a share chosen by position (`consecutive`,
`uniform`), by the similarity of neighbours (`similar`) or by the attention the items receive (`attention`); the
result is a slerpviz.merge.MergePlan, which slerpviz.merge executes. `plan_stages` composes one plan per cutoff, and
`slot_positions` says where each merged slot sits for RoPE. Small pure functions over tensors, like slerpviz.merge,
which is all of slerpviz they import.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .merge import CHOICES, POSITION_MODES, MergePlan, check_ratio, known_name, ratio_per_stage


# --------------------------------------------------------------------------------------------------------------------
# The plan: which items become one slot
# --------------------------------------------------------------------------------------------------------------------


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



# Every pair choice below is tensor work on the device the scores live on, with no value read back to the host: on a
# GPU each read is a synchronisation that stalls the launch queue (issue 23 measured 14 of them in one merge). The
# choices return a mask over the items, True at the first item of each pair to merge; only turning the mask into
# slots (plan_from_mask) needs the number of pairs, and that is known ahead for every choice but `similar` and the
# `attention` choice's kept budget.


def eligible_pairs(length: int, keep_start: int = 0, keep_end: int = 0, device=None) -> torch.Tensor:
    """First items of the pairs that may merge: (lead, lead + 1), (lead + 2, lead + 3), ... within the middle."""
    lead, end = _middle(length, keep_start, keep_end)
    return torch.arange(lead, max(end - 1, lead), 2, device=device)


def pair_count(eligible: int, ratio: float) -> int:
    """How many of `eligible` pairs a merge ratio asks for (rounded half up)."""
    return math.floor(ratio * eligible + 0.5)


def choose_pairs(
    length: int, keep_start: int = 0, keep_end: int = 0, ratio: float = 1.0, choice: str = "consecutive",
    similarity: torch.Tensor | None = None, attention: torch.Tensor | None = None, keep_top: int = 0,
    cosine_share: float = 0.0, reach: int = 0,
) -> torch.Tensor:
    """First items of the pairs (i, i + 1) to merge, sorted, never overlapping, never protected, first or last.

    The eligible pairs are the consecutive pairs of the middle, (lead, lead+1), (lead+2, lead+3), ...; `ratio` of
    them are merged: the first ones (`consecutive`), spread evenly (`uniform`), for `similar` the most similar
    adjacent pairs by `similarity` [length - 1], the cosine of items i and i + 1, at any offset, and for
    `attention` the least-attended eligible pairs by `attention` [length] (see least_attended_on_grid; with
    `reach` > 0 a pair ranks with the most attended item within reach, with `cosine_share` > 0 its ranking also
    weighs how alike the pair is, by `similarity`).
    """
    mask, _ = pair_mask(length, keep_start, keep_end, ratio, choice, similarity, attention, keep_top, cosine_share,
                        reach)
    return torch.nonzero(mask).flatten()


def pair_mask(
    length: int, keep_start: int = 0, keep_end: int = 0, ratio: float = 1.0, choice: str = "consecutive",
    similarity: torch.Tensor | None = None, attention: torch.Tensor | None = None, keep_top: int = 0,
    cosine_share: float = 0.0, reach: int = 0, device=None,
) -> tuple[torch.Tensor, int | None]:
    """choose_pairs as a mask: bool [length], True at the first item of each pair to merge, on the scores' device
    (or `device`), and the number of pairs where it is known without reading the scores (None otherwise)."""
    check_spans(length, keep_start, keep_end)
    check_ratio(ratio)
    known_name(choice, CHOICES, "pair choice")
    scores = attention if choice == "attention" else similarity if choice == "similar" else None
    device = scores.device if scores is not None else device
    lead, end = _middle(length, keep_start, keep_end)
    grid = eligible_pairs(length, keep_start, keep_end, device)
    count = pair_count(grid.numel(), ratio)
    mask = torch.zeros(length, dtype=torch.bool, device=device)
    if choice == "consecutive":
        return mask.index_fill_(0, grid[:count], True), count
    if choice == "uniform":
        spread = ((torch.arange(count, device=device) + 0.5) * grid.numel() / max(count, 1)).long()
        return mask.index_fill_(0, grid[spread], True), count
    if choice == "attention":
        if attention is None:
            raise ValueError("the 'attention' pair choice needs the attention each item receives")
        if cosine_share > 0 and similarity is None:
            raise ValueError("mixing the cosine into the 'attention' pair choice needs the adjacent similarities")
        on_grid = least_attended_on_grid(attention, grid, count, keep_top, similarity if cosine_share > 0 else None,
                                         cosine_share, reach)
        known = count if keep_top <= 0 or count == 0 else None  # kept tokens may leave fewer pairs than asked
        return mask.index_put_((grid,), on_grid), known
    if similarity is None:
        raise ValueError("the 'similar' pair choice needs the similarity of adjacent hidden states")
    mask[:-1] = most_similar_mask(similarity, lead, end, count)
    return mask, (0 if count == 0 else None)


def least_attended_on_grid(attention: torch.Tensor, grid: torch.Tensor, count: int, keep_top: int = 0,
                           similarity: torch.Tensor | None = None, cosine_share: float = 0.0,
                           reach: int = 0) -> torch.Tensor:
    """bool [grid]: the `count` pairs of the grid (i, i + 1 for i in grid) whose more-attended member receives the
    least attention; a pair holding one of the `keep_top` most-attended items never merges (so fewer may merge).

    A pair is scored by its maximum, not its sum: one token the prompt looks at is reason enough to keep a pair.
    With `reach` R > 0 the pairs rank by the spread attention (spread_attention), so the items around an attended
    one stay too, but the `keep_top` items are still the most attended themselves: ranked by the spread score, the
    budget would go to the plateaus (2R + 1 wide) around the few highest peaks instead of to `keep_top` places.
    With `similarity` [length - 1] (the cosine of items i and i + 1) and `cosine_share` s, pairs are ranked by
    (1 - s) * their rank by attention + s * their rank by dissimilarity: ranks, because an attention weight and a
    cosine have no common scale. Ties go to the earlier pair, so the result is deterministic.
    """
    if grid.numel() == 0 or count <= 0:
        return torch.zeros(grid.numel(), dtype=torch.bool, device=grid.device)
    scores = attention.float()
    second = grid + 1
    ranked = spread_attention(scores, reach)
    pair_score = torch.maximum(ranked[grid], ranked[second])
    if keep_top <= 0 and (similarity is None or cosine_share <= 0):
        return ranks(pair_score) < count
    allowed = torch.ones_like(pair_score, dtype=torch.bool)
    if keep_top > 0:
        kept = torch.zeros(scores.numel(), dtype=torch.bool, device=scores.device)
        kept.index_fill_(0, scores.topk(min(keep_top, scores.numel())).indices, True)
        allowed = ~(kept[grid] | kept[second])
    # A pair that may not merge ranks after every other (+inf), so the ranks of the allowed ones are theirs alone.
    pair_score = torch.where(allowed, pair_score, math.inf)
    if similarity is not None and cosine_share > 0:
        unlike = torch.where(allowed, 1 - similarity.float()[grid], math.inf)
        allowed_count = allowed.sum()
        mixed = (1 - cosine_share) * share_ranks(pair_score, allowed_count) + cosine_share * share_ranks(
            unlike, allowed_count)
        pair_score = torch.where(allowed, mixed, math.inf)
    return (ranks(pair_score) < count) & allowed


def spread_attention(attention: torch.Tensor, reach: int) -> torch.Tensor:
    """Each item's attention raised to the largest within `reach` items on either side: a max-pool of width
    2 * reach + 1, as SnapKV clusters what its window attends to. The words around a token the prompt looks at then
    rank with it, so a fact stays whole rather than only its most-attended token."""
    if reach <= 0:
        return attention
    # The max over each window of the padded scores (what max_pool1d computes; its shape rule fixes the length when
    # compiled, this keeps it symbolic).
    padded = F.pad(attention, (reach, reach), value=-math.inf)
    return padded.unfold(0, 2 * reach + 1, 1).amax(-1)


def ranks(values: torch.Tensor) -> torch.Tensor:
    """Each value's rank among `values`, 0 for the smallest, ties in order of position (long [n])."""
    return torch.sort(values, stable=True).indices.argsort()  # the inverse of the sorting permutation


def share_ranks(values: torch.Tensor, count: int | torch.Tensor | None = None) -> torch.Tensor:
    """Each value's rank among `values` as a share in [0, 1] (0 for the smallest; ties by order), the ranks divided
    by count - 1 (default: the number of values; a tensor when only the device knows how many count)."""
    count = values.numel() if count is None else count
    scale = (count - 1).clamp_min(1) if torch.is_tensor(count) else max(count - 1, 1)
    return ranks(values).float() / scale


def most_similar_pairs(similarity: torch.Tensor, lead: int, end: int, count: int) -> torch.Tensor:
    """First items of the pairs most_similar_mask chooses, sorted."""
    return torch.nonzero(most_similar_mask(similarity, lead, end, count)).flatten()


def most_similar_mask(similarity: torch.Tensor, lead: int, end: int, count: int) -> torch.Tensor:
    """bool [length - 1]: greedy non-overlapping matching of the adjacent pairs of [lead, end) by similarity, then
    the `count` most similar of it.

    Greedy takes the most similar pair, drops its two neighbours, and repeats; ties go to the earlier pair, so the
    result is deterministic. A greedy matching holds at least a third of the middle; when `count` asks for more,
    fewer pairs are merged.

    Greedy on a path needs no rounds. A pair is settled by its neighbours only when they are more similar, so it
    lies on a slope that climbs to a peak (a pair more similar than both neighbours, taken first). Down a slope the
    pairs alternate, taken at even distance from the peak; a valley (both neighbours more similar) is taken when
    neither neighbour is. That is a few prefix scans, on the device, whatever the similarities.
    """
    length = similarity.numel()
    sim = similarity.detach().float()
    index = torch.arange(length, device=sim.device)
    valid = (index >= lead) & (index < end - 1)
    score = sim.masked_fill(~valid, -math.inf)
    # Ties go to the earlier pair: the left neighbour wins on equal scores, the right one only when strictly above.
    left_wins = F.pad(valid[:-1] & (score[:-1] >= score[1:]), (1, 0))
    right_wins = F.pad(valid[1:] & (score[1:] > score[:-1]), (0, 1))
    peak = valid & ~left_wins & ~right_wins
    down_right = valid & left_wins & ~right_wins  # on a slope falling from a peak on its left
    down_left = valid & right_wins & ~left_wins
    from_left_peak = index - torch.cummax(torch.where(down_right, -1, index), 0).values
    from_right_peak = torch.cummin(torch.where(down_left, length, index).flip(0), 0).values.flip(0) - index
    taken = peak | (down_right & (from_left_peak % 2 == 0)) | (down_left & (from_right_peak % 2 == 0))
    valley = valid & left_wins & right_wins
    neighbour_taken = F.pad(taken[:-1], (1, 0)) | F.pad(taken[1:], (0, 1))
    taken = taken | (valley & ~neighbour_taken)
    # Then the `count` most similar of the matching: rank the taken pairs by similarity, ties to the earlier pair.
    return taken & (ranks(torch.where(taken, -sim, math.inf)) < count)


def plan_from_pairs(
    length: int, pair_starts: torch.Tensor, keep_start: int = 0, keep_end: int = 0,
    weights: torch.Tensor | None = None,
) -> MergePlan:
    """The plan that merges items (i, i + 1) for each i in pair_starts and keeps every other item alone."""
    is_pair_start = torch.zeros(length, dtype=torch.bool, device=pair_starts.device)
    is_pair_start[pair_starts] = True
    return plan_from_mask(length, is_pair_start, keep_start, keep_end, weights, pairs=int(pair_starts.numel()))


def plan_from_mask(
    length: int, is_pair_start: torch.Tensor, keep_start: int = 0, keep_end: int = 0,
    weights: torch.Tensor | None = None, pairs: int | None = None,
) -> MergePlan:
    """The plan that merges items (i, i + 1) wherever is_pair_start [length] is True and keeps every other item
    alone, on the mask's device. With `pairs`, the number of True values, the slots are found without reading
    anything back to the host; without, one read (the number of slots) is the only one.

    `weights` (tokens held by each item, default 1) set t = w_b / (w_a + w_b), so a slot holding two tokens meeting
    a single one weighs 2:1.
    """
    keeps = ~F.pad(is_pair_start[:-1], (1, 0))  # every item but the second of a pair starts a slot
    starts = (torch.nonzero(keeps) if pairs is None else torch.nonzero_static(keeps, size=length - pairs))[:, 0]
    pair = is_pair_start[starts]
    sizes = pair + 1
    ends = starts + pair
    # Singles before the first pair sit as (zero, x) at t = 1, the others as (x, zero) at t = 0: the article's
    # layout, with index `length` standing for the zero row.
    before = torch.cumsum(pair, 0) == 0
    a_index = torch.where(before, length, starts)
    b_index = torch.where(pair, ends, torch.where(before, starts, length))
    if weights is None:
        t_pair = 0.5
    else:
        w = weights.to(is_pair_start.device, torch.float32)
        end_weight = w[ends]
        t_pair = end_weight / (w[starts] + end_weight)
    t = torch.where(pair, t_pair, before.float())
    return MergePlan(length, keep_start, keep_end, starts, sizes, ends, a_index, b_index, t)


def plan_merge(
    length: int, keep_start: int = 0, keep_end: int = 0, ratio: float = 1.0, choice: str = "consecutive",
    similarity: torch.Tensor | None = None, weights: torch.Tensor | None = None,
    attention: torch.Tensor | None = None, keep_top: int = 0, cosine_share: float = 0.0, reach: int = 0,
    device=None,
) -> MergePlan:
    """Pair consecutive items, except the protected spans and the first and last item, which stay alone.

    By default the whole unprotected middle is cut into consecutive pairs; when it has odd length its last item
    stays alone. `ratio` and `choice` merge only some of the pairs (see choose_pairs). The plan lives on the scores'
    device, or `device` for the choices that need none.
    """
    mask, pairs = pair_mask(length, keep_start, keep_end, ratio, choice, similarity, attention, keep_top,
                            cosine_share, reach, device)
    return plan_from_mask(length, mask, keep_start, keep_end, weights, pairs)


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
    def slot_tokens(self) -> list[tuple[int, ...]]:
        """Original token positions of each slot after this stage."""
        return [tuple(range(f, l + 1)) for f, l in zip(self.first.tolist(), self.last.tolist())]

    def to(self, device) -> "Stage":
        return Stage(self.cutoff, self.plan.to(device), self.first.to(device), self.last.to(device))


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
                      cosine_share, reach, device=first.device)
    return Stage(cutoff, plan, first[plan.starts], last[plan.ends])



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
    # Stages run in layer order, and a per-cutoff ratio travels with its cutoff: cutoffs (4, 2) with ratios (1, 0.5)
    # merge half the pairs at layer 2, then all at layer 4.
    for cutoff, stage_ratio in sorted(zip(cutoffs, ratios), key=lambda pair: pair[0]):
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
    known_name(mode, POSITION_MODES, "positions mode")
    if mode == "mean":
        return (first + last) * 0.5
    if mode == "first":
        return first.float()
    return torch.arange(first.numel(), dtype=torch.float32, device=first.device)  # renumber


def last_slot_offset(length: int, slots: int, mode: str = "mean") -> int:
    """Where the last token's slot sits, minus where the token sat: a token after the prompt sits at its own position
    plus this. The last token is always a slot of its own, so every mode places it at length - 1, except renumber,
    which places it at slots - 1. Known without reading the positions back from the device."""
    known_name(mode, POSITION_MODES, "positions mode")
    return slots - length if mode == "renumber" else 0
