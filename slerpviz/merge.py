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

from dataclasses import dataclass

import torch

METHODS = ("slerp", "lerp", "seed-2024")
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


INTERPOLATE = {"slerp": slerp, "lerp": lerp, "seed-2024": seed2024}


def check_method(method: str) -> None:
    if method not in INTERPOLATE:
        raise ValueError(f"unknown merge method {method!r}; choose one of {', '.join(METHODS)}")


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


def plan_merge(length: int, keep_start: int = 0, keep_end: int = 0) -> MergePlan:
    """Pair consecutive items, except the protected spans and the first and last item, which stay alone.

    The unprotected middle is cut into consecutive pairs; when it has odd length its last item stays alone.
    """
    check_spans(length, keep_start, keep_end)
    lead = min(max(keep_start, 1), length)
    tail = min(max(keep_end, 1), length - lead)
    middle = length - lead - tail
    pairs = middle // 2
    pair_starts = lead + 2 * torch.arange(pairs)
    singles_after = torch.arange(lead + 2 * pairs, length)
    starts = torch.cat([torch.arange(lead), pair_starts, singles_after])
    sizes = torch.cat(
        [torch.ones(lead, dtype=torch.long), torch.full((pairs,), 2), torch.ones(len(singles_after), dtype=torch.long)]
    )
    zero = torch.full((), length)
    # Singles before the pairs sit as (zero, x) at t = 1, singles after as (x, zero) at t = 0: the article's layout.
    a_index = torch.cat([zero.expand(lead), pair_starts, singles_after])
    b_index = torch.cat([torch.arange(lead), pair_starts + 1, zero.expand(len(singles_after))])
    t = torch.cat([torch.ones(lead), torch.full((pairs,), 0.5), torch.zeros(len(singles_after))])
    slots = starts.numel()
    slot_index = torch.arange(slots)
    protected = (slot_index < keep_start) | (slot_index >= slots - keep_end)
    return MergePlan(length, keep_start, keep_end, starts, sizes, a_index, b_index, t, protected)


def apply_plan(x: torch.Tensor, plan: MergePlan, method: str = "slerp") -> torch.Tensor:
    """Merge x [batch, length, d] into [batch, slots, d]: one gather and one batched interpolation."""
    check_method(method)
    padded = torch.cat([x, x.new_zeros(x.shape[0], 1, x.shape[-1])], dim=1)
    device = x.device
    a = padded.index_select(1, plan.a_index.to(device))
    b = padded.index_select(1, plan.b_index.to(device))
    return INTERPOLATE[method](a, b, plan.t.to(device))


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
    def groups(self) -> list[tuple[int, ...]]:
        """Original token positions of each slot after this stage."""
        return [tuple(range(f, l + 1)) for f, l in zip(self.first.tolist(), self.last.tolist())]


def plan_stages(length: int, cutoffs: tuple[int, ...], keep_start: int = 0, keep_end: int = 0) -> list[Stage]:
    """One plan per cutoff, each over the slots of the stage before; the spans compose to original tokens.

    Protected tokens are singles at both ends of every stage, so the same keep_start / keep_end counted in slots
    protect the same original tokens at every stage.
    """
    check_spans(length, keep_start, keep_end)
    first = last = torch.arange(length)
    stages = []
    for cutoff in sorted(cutoffs):
        plan = plan_merge(first.numel(), keep_start, keep_end)
        first, last = first[plan.starts], last[plan.starts + plan.sizes - 1]
        stages.append(Stage(cutoff, plan, first, last))
    return stages


def slot_positions(first: torch.Tensor, last: torch.Tensor, mode: str = "mean") -> torch.Tensor:
    """RoPE position of each slot: the mean of its tokens' positions, its first token's, or 0..slots-1."""
    if mode == "mean":
        return (first + last).float() / 2
    if mode == "first":
        return first.float()
    if mode == "renumber":
        return torch.arange(first.numel(), dtype=torch.float32)
    raise ValueError(f"unknown positions mode {mode!r}; choose one of {', '.join(POSITION_MODES)}")
