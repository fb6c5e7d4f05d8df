"""Merge maths: how two hidden states become one, and a merge stage as data.

Nothing here knows about models, and nothing here imports the rest of slerpviz. Every function is a small pure
function over tensors, so the engine can execute a plan and the plots can draw the very same plan; which items pair
(the plan's making) is slerpviz.pairs'.

A plan describes one merge stage over a sequence of `length` items (tokens, or slots of an earlier stage). Each
output slot is written as an interpolation of two rows `a_index`, `b_index` at weight `t`. A slot that keeps a
single item interpolates it with a zero row (index `length`) at t = 0 or t = 1, which returns the item exactly for
every method. That one layout is the article's own (it padded with zero vectors), so `seed-2024` is reproduced
faithfully, including its whole-tensor norm, and the engine has a single vectorised code path for all methods.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


INTERPOLATIONS = ("slerp", "lerp", "slerp-dir", "seed-2024")  # ways to make one vector of two
# ... and the control they are measured against: keep one of the two, as token pruning does (see `drop`).
METHODS = (*INTERPOLATIONS, "drop")
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
    return slerp_and_cosine(a, b, t)[0]


def slerp_and_cosine(a: torch.Tensor, b: torch.Tensor, t: float | torch.Tensor = 0.5
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """slerp(a, b, t) and the cosine of each pair [...] it measured on the way (0 where a vector is zero), so a
    caller that shows the angles need not compute them twice."""
    a32, b32 = a.float(), b.float()
    w = _as_weight(t, a)
    norm_a = a32.norm(dim=-1, keepdim=True)
    norm_b = b32.norm(dim=-1, keepdim=True)
    cos = ((a32 * b32).sum(-1, keepdim=True) / (norm_a * norm_b).clamp_min(_EPS)).clamp(-1.0, 1.0)
    linear = (cos.abs() > PARALLEL_COS) | (torch.minimum(norm_a, norm_b) <= _EPS)
    theta = torch.acos(cos)
    sin_theta = torch.where(linear, 1.0, torch.sin(theta))
    rest = 1 - w
    weight_a = torch.where(linear, rest, torch.sin(rest * theta) / sin_theta)
    weight_b = torch.where(linear, w, torch.sin(w * theta) / sin_theta)
    return (weight_a * a32 + weight_b * b32).to(a.dtype), cos.squeeze(-1)


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


def drop(a: torch.Tensor, b: torch.Tensor, t: float | torch.Tensor = 0.5) -> torch.Tensor:
    """Keep the pair's first member and discard the second, instead of merging them: token pruning (GemFilter,
    LazyLLM) applied to the very pairs a merge would join, so that merging is measured against dropping at equal
    length. A single slot is returned whole, as by every method (t = 1 stands for (zero, x), t = 0 for (x, zero)).
    The kept token sits where it sat with `positions="first"`."""
    return torch.where(_as_weight(t, a) >= 1, b, a)


INTERPOLATE = {"slerp": slerp, "lerp": lerp, "slerp-dir": slerp_dir, "seed-2024": seed2024, "drop": drop}


def known_name(value, names: tuple[str, ...], what: str) -> str:
    """A name the maths knows, or ValueError (the raw-value checks with their field names are slerpviz.settings')."""
    if value not in names:
        raise ValueError(f"unknown {what} {value!r}; choose one of {', '.join(names)}")
    return value


def cosine(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """Cosine similarity per vector over the last dimension, float32, 0 for zero vectors."""
    a32, b32 = a.float(), b.float()
    return (a32 * b32).sum(-1) / (a32.norm(dim=-1) * b32.norm(dim=-1)).clamp_min(_EPS)


# --------------------------------------------------------------------------------------------------------------------
# A merge stage as data
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
    ends: torch.Tensor  # long [slots]: the last item of each slot
    a_index: torch.Tensor  # long [slots]
    b_index: torch.Tensor  # long [slots]
    t: torch.Tensor  # float32 [slots]

    @property
    def merged_length(self) -> int:
        return int(self.starts.numel())

    @property
    def protected(self) -> torch.Tensor:
        """bool [slots]: inside a protected span (the spans are singles at both ends, counted in slots)."""
        slot = torch.arange(self.merged_length, device=self.starts.device)
        return (slot < self.keep_start) | (slot >= self.merged_length - self.keep_end)

    def to(self, device) -> "MergePlan":
        """The same plan with its tensors on `device` (a plan made on the CPU, run on a GPU)."""
        return MergePlan(self.length, self.keep_start, self.keep_end,
                         *(getattr(self, name).to(device)
                           for name in ("starts", "sizes", "ends", "a_index", "b_index", "t")))

    @property
    def pair_slots(self) -> torch.Tensor:
        """Indices of the slots that merge two items."""
        return torch.nonzero(self.sizes == 2).flatten()

    @property
    def slot_items(self) -> list[tuple[int, ...]]:
        """The items of each slot, in order: [(0,), (1, 2), (3, 4), (5,)] for example."""
        return [tuple(range(s, s + z)) for s, z in zip(self.starts.tolist(), self.sizes.tolist())]


# A merge ratio is the share of eligible pairs merged at a cutoff, one per cutoff or one for all.


def check_ratio(ratio: float) -> None:
    if not 0 <= ratio <= 1:
        raise ValueError(f"merge ratio {ratio!r} must be between 0 and 1 (the share of eligible pairs merged)")


def ratio_per_stage(ratio: float | tuple[float, ...], stages: int) -> tuple[float, ...]:
    """One merge ratio per cutoff: a single number applies to all."""
    ratios = (ratio,) * stages if isinstance(ratio, (int, float)) else tuple(ratio)
    if len(ratios) != stages:
        raise ValueError(f"{len(ratios)} merge ratios for {stages} cutoffs: give one, or one per cutoff")
    for r in ratios:
        check_ratio(r)
    return ratios


# --------------------------------------------------------------------------------------------------------------------
# Executing a plan
# --------------------------------------------------------------------------------------------------------------------


def gather_pairs(x: torch.Tensor, plan: MergePlan) -> tuple[torch.Tensor, torch.Tensor]:
    """The two rows each slot interpolates, from x [batch, length, d]: [batch, slots, d] each (a zero row where a
    slot keeps a single item)."""
    padded = torch.cat([x, x.new_zeros(x.shape[0], 1, x.shape[-1])], dim=1)
    return padded.index_select(1, plan.a_index), padded.index_select(1, plan.b_index)


def apply_plan(x: torch.Tensor, plan: MergePlan, method: str = "slerp") -> torch.Tensor:
    """Merge x [batch, length, d] into [batch, slots, d]: one gather and one batched interpolation."""
    known_name(method, METHODS, "merge method")
    plan = plan.to(x.device)
    a, b = gather_pairs(x, plan)
    return INTERPOLATE[method](a, b, plan.t)


def adjacent_cosines(x: torch.Tensor) -> torch.Tensor:
    """Cosine similarity of every item with the next one, x [batch, length, d] -> [batch, length - 1]."""
    return cosine(x[:, :-1], x[:, 1:])


def pair_cosines(x: torch.Tensor, plan: MergePlan) -> torch.Tensor:
    """Cosine similarity of the two members of each merged pair of x [batch, length, d]: [batch, pairs]."""
    first = plan.starts[plan.pair_slots].to(x.device)
    return cosine(x.index_select(1, first), x.index_select(1, first + 1))
