"""The merge maths on its own: interpolation properties and plan properties."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st

from slerpviz.merge import CHOICES, apply_plan, lerp, pair_cosines, slerp, slerp_dir
from slerpviz.pairs import (
    choose_pairs, merged_length, most_similar_pairs, plan_from_pairs, plan_merge, plan_stages, share_ranks,
    slot_positions, spread_attention,
)


def angle(a, b):
    return torch.acos((torch.nn.functional.cosine_similarity(a, b, dim=-1)).clamp(-1, 1))


# ------------------------------------------------------------------------------------------------------------ slerp


@pytest.mark.parametrize("interpolate", [slerp, lerp])
def test_endpoints_give_the_inputs(interpolate):
    a, b = torch.randn(5, 16), torch.randn(5, 16)
    torch.testing.assert_close(interpolate(a, b, 0.0), a)
    torch.testing.assert_close(interpolate(a, b, 1.0), b)


def test_slerp_moves_along_the_great_circle():
    # Vectors of equal norm: the weights then trace the arc between them at a constant angular speed.
    a = torch.nn.functional.normalize(torch.randn(50, 32), dim=-1) * 3
    b = torch.nn.functional.normalize(torch.randn(50, 32), dim=-1) * 3
    theta = angle(a, b)
    for t in (0.1, 0.25, 0.5, 0.9):
        out = slerp(a, b, t)
        torch.testing.assert_close(angle(a, out), t * theta, atol=1e-4, rtol=1e-4)
        torch.testing.assert_close(angle(out, b), (1 - t) * theta, atol=1e-4, rtol=1e-4)


def test_slerp_of_unit_vectors_stays_on_the_sphere():
    a = torch.nn.functional.normalize(torch.randn(20, 8), dim=-1)
    b = torch.nn.functional.normalize(torch.randn(20, 8), dim=-1)
    for t in (0.3, 0.5, 0.7):
        torch.testing.assert_close(slerp(a, b, t).norm(dim=-1), torch.ones(20), atol=1e-5, rtol=0)
    # ...while the mean of two unit vectors is shorter: lerp shrinks, slerp does not.
    assert (lerp(a, b, 0.5).norm(dim=-1) < 1 - 1e-3).all()


def test_slerp_at_half_is_the_mean_scaled_by_one_over_cos_half_angle():
    a, b = torch.randn(30, 64) * 3, torch.randn(30, 64)
    theta = angle(a, b).unsqueeze(-1)
    torch.testing.assert_close(slerp(a, b, 0.5), lerp(a, b, 0.5) / torch.cos(theta / 2), atol=1e-5, rtol=1e-4)


def test_slerp_is_per_vector_and_takes_a_weight_per_vector():
    a, b = torch.randn(4, 6, 10), torch.randn(4, 6, 10)
    t = torch.rand(6)
    out = slerp(a, b, t)
    for i in range(6):
        torch.testing.assert_close(out[:, i], slerp(a[:, i], b[:, i], float(t[i])))


def test_slerp_nearly_parallel_falls_back_to_lerp_without_nan():
    a = torch.randn(10, 32)
    b = a + 1e-4 * torch.randn(10, 32)
    out = slerp(a, b, 0.5)
    assert torch.isfinite(out).all()
    torch.testing.assert_close(out, lerp(a, b, 0.5))
    torch.testing.assert_close(slerp(a, a, 0.5), a)


@pytest.mark.parametrize("t", [0.0, 0.3, 0.5, 1.0])
def test_slerp_zero_and_opposite_vectors_give_no_nan(t):
    a = torch.randn(3, 8)
    zero = torch.zeros(3, 8)
    for x, y in [(a, zero), (zero, a), (zero, zero), (a, -a)]:
        out = slerp(x, y, t)
        assert torch.isfinite(out).all()
        torch.testing.assert_close(out, lerp(x, y, t))


def slerp_reference(a: torch.Tensor, b: torch.Tensor, t: float) -> torch.Tensor:
    """SLERP written out in float64, per vector, from the textbook formula (no fallbacks: vectors far from parallel)."""
    a, b = a.double(), b.double()
    cos = (a * b).sum(-1, keepdim=True) / (a.norm(dim=-1, keepdim=True) * b.norm(dim=-1, keepdim=True))
    theta = torch.acos(cos)
    return (torch.sin((1 - t) * theta) * a + torch.sin(t * theta) * b) / torch.sin(theta)


@pytest.mark.parametrize("t", [0.3, 0.5])
def test_slerp_computes_in_float32_and_returns_the_input_dtype(t):
    generator = torch.Generator().manual_seed(0)
    a, b = (torch.randn(64, 256, generator=generator).bfloat16() for _ in range(2))
    reference = slerp_reference(a, b, t)  # from the same bf16 inputs, in float64
    out = slerp(a, b, t)
    assert out.dtype == torch.bfloat16
    # Computed in float32 and rounded once, every element is within one bf16 step (2**-7, relative) of the exact
    # value; an interpolation computed in bf16 itself (its norms and dot products) misses by several.
    torch.testing.assert_close(out.double(), reference, rtol=2**-7, atol=1e-3)


# ------------------------------------------------------------------------------------------------------- seed-2024


def article_merge(x: torch.Tensor) -> torch.Tensor:
    """The article's whole-sequence merge, driven through the plan with its default layout."""
    return apply_plan(x[None], plan_merge(x.shape[0]), "seed-2024")[0]


def test_seed2024_matches_a_hand_worked_example():
    # x0..x3 (even n = 4): the article pads [0, x0, x1, x2, x3, 0] and pairs (0,x0) t=1, (x1,x2) t=.5, (x3,0) t=0.
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0], [1.0, 1.0], [2.0, 0.0]])
    # First members A = [0, x1, x3] = [[0,0],[0,1],[2,0]]: Frobenius norm sqrt(5).
    # Second members B = [x0, x2, 0] = [[1,0],[1,1],[0,0]]: Frobenius norm sqrt(3).
    # Middle pair: dot = (x1·x2)/sqrt(15) = 1/sqrt(15); theta = acos(1/sqrt(15)) = 1.3096...
    # weight = sin(theta/2)/sin(theta) = 1/(2 cos(theta/2)) = 0.6304...; result = weight * (x1 + x2) = w * (1, 2).
    theta = math.acos(1 / math.sqrt(15))
    weight = math.sin(theta / 2) / math.sin(theta)
    assert weight == pytest.approx(0.6304, abs=1e-4)
    expected = torch.tensor([[1.0, 0.0], [weight, 2 * weight], [2.0, 0.0]])
    torch.testing.assert_close(article_merge(x), expected)


def test_seed2024_odd_length_layout():
    # Odd n = 5: [0, x0, x1, x2, x3, 0, x4, 0]: (0,x0) t=1, (x1,x2) t=.5, (x3,0) t=0, (x4,0) t=0 -> (n+3)/2 slots.
    x = torch.randn(5, 4)
    out = article_merge(x)
    assert out.shape[0] == (5 + 3) // 2
    torch.testing.assert_close(out[0], x[0])
    torch.testing.assert_close(out[2], x[3])
    torch.testing.assert_close(out[3], x[4])
    first = torch.stack([torch.zeros(4), x[1], x[3], x[4]])
    second = torch.stack([x[0], x[2], torch.zeros(4), torch.zeros(4)])
    theta = math.acos(float((x[1] / first.norm()) @ (x[2] / second.norm())))
    expected = (math.sin(theta / 2) * x[1] + math.sin(theta / 2) * x[2]) / math.sin(theta)
    torch.testing.assert_close(out[1], expected)


@pytest.mark.parametrize("n", [1, 2, 3])
def test_seed2024_leaves_short_sequences_as_they_are(n):
    x = torch.randn(n, 6)
    torch.testing.assert_close(article_merge(x), x)


def test_seed2024_is_about_the_sum_over_root_two_not_a_slerp():
    # The flaw: with a whole-tensor norm each pair's "cosine" is tiny, so both weights are ~ 1/sqrt(2).
    x = torch.randn(512, 256) + 0.5
    out = article_merge(x)[1:-1]
    a, b = x[1:-1:2], x[2:-1:2]
    torch.testing.assert_close(out, (a + b) / math.sqrt(2), atol=0.02, rtol=0.02)
    assert not torch.allclose(out, slerp(a, b, 0.5), atol=0.05)


# ------------------------------------------------------------------------------------------------------------ plans


@settings(max_examples=300, deadline=None)
@given(st.integers(1, 300), st.integers(0, 50), st.integers(0, 50))
def test_plan_partitions_the_sequence_in_order(length, keep_start, keep_end):
    if keep_start + keep_end > length:
        with pytest.raises(ValueError, match="longer than the prompt"):
            plan_merge(length, keep_start, keep_end)
        return
    plan = plan_merge(length, keep_start, keep_end)
    groups = plan.slot_items
    flat = [i for group in groups for i in group]
    assert flat == list(range(length))  # each position exactly once, order kept
    assert all(len(g) in (1, 2) for g in groups)
    assert plan.merged_length == merged_length(length, keep_start, keep_end) == len(groups)
    assert groups[0] == (0,) and groups[-1] == (length - 1,)
    protected_positions = set(range(keep_start)) | set(range(length - keep_end, length))
    for group, is_protected in zip(groups, plan.protected.tolist()):
        if set(group) & protected_positions:
            assert group in [(p,) for p in protected_positions] and is_protected
        else:
            assert not is_protected
    middle = max(length - max(keep_start, 1) - max(keep_end, 1), 0)
    assert sum(len(g) == 2 for g in groups) == middle // 2  # the rest is paired; an odd one out stays alone


def test_plan_pairs_consecutively_with_the_odd_one_out_last():
    assert plan_merge(8).slot_items == [(0,), (1, 2), (3, 4), (5, 6), (7,)]
    assert plan_merge(9).slot_items == [(0,), (1, 2), (3, 4), (5, 6), (7,), (8,)]
    assert plan_merge(10, keep_start=3, keep_end=2).slot_items == [(0,), (1,), (2,), (3, 4), (5, 6), (7,), (8,), (9,)]


@pytest.mark.parametrize("keep_start, keep_end", [(-1, 0), (0, -2)])
def test_negative_spans_are_refused(keep_start, keep_end):
    with pytest.raises(ValueError, match="must not be negative"):
        plan_merge(10, keep_start, keep_end)


@settings(max_examples=100, deadline=None)
@given(st.integers(1, 200), st.lists(st.integers(0, 12), min_size=1, max_size=4), st.integers(0, 5), st.integers(0, 5))
def test_stages_compose_to_contiguous_spans_of_original_tokens(length, cutoffs, keep_start, keep_end):
    if keep_start + keep_end > length:
        return
    stages = plan_stages(length, tuple(cutoffs), keep_start, keep_end)
    assert [s.cutoff for s in stages] == sorted(cutoffs)
    previous = length
    for stage in stages:
        groups = stage.slot_tokens
        assert [i for g in groups for i in g] == list(range(length))
        assert len(groups) == stage.plan.merged_length == merged_length(previous, keep_start, keep_end)
        for position in [*range(keep_start), *range(length - keep_end, length), 0, length - 1]:
            assert (position,) in groups  # protected and first/last tokens are never merged, at any stage
        previous = len(groups)


def test_slot_positions():
    stage = plan_stages(7, (1,))[0]  # [(0,), (1, 2), (3, 4), (5,), (6,)]
    assert slot_positions(stage.first, stage.last, "mean").tolist() == [0, 1.5, 3.5, 5, 6]
    assert slot_positions(stage.first, stage.last, "first").tolist() == [0, 1, 3, 5, 6]
    assert slot_positions(stage.first, stage.last, "renumber").tolist() == [0, 1, 2, 3, 4]
    with pytest.raises(ValueError, match="positions mode"):
        slot_positions(stage.first, stage.last, "last")


@pytest.mark.parametrize("method", ["slerp", "lerp", "slerp-dir", "seed-2024", "drop"])
def test_apply_plan_merges_pairs_and_copies_singles_exactly(method):
    x = torch.randn(2, 11, 16)
    plan = plan_merge(11, keep_start=2, keep_end=3)
    out = apply_plan(x, plan, method)
    assert out.shape == (2, plan.merged_length, 16)
    for slot, group in enumerate(plan.slot_items):
        if len(group) == 1:
            assert torch.equal(out[:, slot], x[:, group[0]])
        elif method == "drop":  # the pair's first member, exactly; the second is gone
            assert torch.equal(out[:, slot], x[:, group[0]])
        elif method != "seed-2024":
            interpolate = {"slerp": slerp, "lerp": lerp, "slerp-dir": slerp_dir}[method]
            torch.testing.assert_close(out[:, slot], interpolate(x[:, group[0]], x[:, group[1]], 0.5))


def test_apply_plan_refuses_an_unknown_method():
    with pytest.raises(ValueError, match="unknown merge method 'mean'"):
        apply_plan(torch.randn(1, 5, 4), plan_merge(5), "mean")


def test_pair_cosines_lists_each_merged_pair():
    x = torch.randn(1, 9, 8)
    plan = plan_merge(9)
    cosines = pair_cosines(x, plan)
    assert cosines.shape == (1, len(plan.pair_slots))
    for k, slot in enumerate(plan.pair_slots.tolist()):
        i = plan.slot_items[slot][0]
        torch.testing.assert_close(cosines[0, k], torch.nn.functional.cosine_similarity(x[0, i], x[0, i + 1], dim=0))


# -------------------------------------------------------------------------- which pairs: ratio, choice, similarity


def reference_greedy(similarity, lead, end):
    """Greedy matching the slow, obvious way: most similar first, earlier wins ties, skip overlapping pairs."""
    order = sorted(range(lead, end - 1), key=lambda i: (-similarity[i], i))
    taken, used = [], set()
    for i in order:
        if i not in used and i + 1 not in used:
            taken.append(i)
            used |= {i, i + 1}
    return taken


@settings(max_examples=200, deadline=None)
@given(st.integers(2, 120), st.integers(0, 6), st.integers(0, 6), st.floats(0, 1), st.sampled_from(CHOICES),
       st.integers(0, 2**31 - 1))
def test_every_choice_keeps_the_plan_invariants(length, keep_start, keep_end, ratio, choice, seed):
    if keep_start + keep_end > length:
        return
    similarity = torch.rand(length - 1, generator=torch.Generator().manual_seed(seed))
    attention = torch.rand(length, generator=torch.Generator().manual_seed(seed + 1))
    plan = plan_merge(length, keep_start, keep_end, ratio, choice, similarity, attention=attention)
    groups = plan.slot_items
    assert [i for g in groups for i in g] == list(range(length))
    assert int(plan.sizes.sum()) == length
    for position in [*range(keep_start), *range(length - keep_end, length), 0, length - 1]:
        assert (position,) in groups
    eligible = max(length - max(keep_start, 1) - max(keep_end, 1), 0) // 2
    pairs = int((plan.sizes == 2).sum())
    if choice == "similar":
        assert pairs <= math.floor(ratio * eligible + 0.5)
        assert plan_merge(length, keep_start, keep_end, ratio, choice, similarity).slot_items == groups  # deterministic
    else:
        assert pairs == math.floor(ratio * eligible + 0.5)


def test_ratio_one_consecutive_is_the_plain_plan_bit_for_bit():
    for length, keep_start, keep_end in [(1, 0, 0), (9, 0, 0), (40, 3, 5), (41, 0, 7)]:
        plain, explicit = plan_merge(length, keep_start, keep_end), plan_merge(length, keep_start, keep_end, 1.0,
                                                                              "consecutive")
        for name in ("starts", "sizes", "a_index", "b_index", "t", "protected"):
            assert torch.equal(getattr(plain, name), getattr(explicit, name))


def test_consecutive_takes_the_first_pairs_and_uniform_spreads_them():
    assert choose_pairs(21, ratio=0.5).tolist() == [1, 3, 5, 7, 9]
    uniform = choose_pairs(21, ratio=0.5, choice="uniform").tolist()  # 10 eligible pairs at 1, 3, ..., 19
    assert uniform == [1, 5, 9, 13, 17][: len(uniform)] or uniform == [3, 7, 11, 15, 19]
    assert len(uniform) == 5 and {b - a for a, b in zip(uniform, uniform[1:])} == {4}


@settings(max_examples=200, deadline=None)
@given(st.integers(2, 80), st.integers(0, 4), st.integers(0, 4), st.integers(0, 2**31 - 1))
def test_similar_is_the_greedy_matching_of_the_most_similar_adjacent_pairs(length, keep_start, keep_end, seed):
    if keep_start + keep_end > length:
        return
    generator = torch.Generator().manual_seed(seed)
    similarity = torch.randint(0, 5, (length - 1,), generator=generator).float()  # many ties on purpose
    lead, end = max(keep_start, 1), max(length - max(keep_end, 1), max(keep_start, 1))
    expected = sorted(reference_greedy(similarity.tolist(), lead, end))
    assert choose_pairs(length, keep_start, keep_end, 1.0, "similar", similarity).tolist() == expected
    count = len(expected) // 2
    best = sorted(sorted(expected, key=lambda i: (-similarity[i], i))[:count])
    assert most_similar_pairs(similarity, lead, end, count).tolist() == best


def test_similar_needs_a_similarity_and_unknown_choices_are_refused():
    with pytest.raises(ValueError, match="needs the similarity"):
        choose_pairs(10, choice="similar")
    with pytest.raises(ValueError, match="unknown pair choice 'random'"):
        choose_pairs(10, choice="random")
    with pytest.raises(ValueError, match="merge ratio 1.5 must be between 0 and 1"):
        choose_pairs(10, ratio=1.5)


def test_size_weights_set_t_by_the_tokens_each_side_holds():
    plan = plan_from_pairs(4, torch.tensor([1]), weights=torch.tensor([1, 2, 1, 1]))
    assert plan.slot_items == [(0,), (1, 2), (3,)]
    assert plan.t[1].item() == pytest.approx(1 / 3)  # a slot of two tokens meets a single one: weights 2:1
    stages = plan_stages(9, (1, 2))  # [(0,), (1,2), (3,4), (5,6), (7,), (8,)] then (1..4), (5..7)
    assert stages[1].slot_tokens == [(0,), (1, 2, 3, 4), (5, 6, 7), (8,)]
    assert stages[1].plan.t[stages[1].plan.pair_slots].tolist() == pytest.approx([0.5, 1 / 3])
    unweighted = plan_stages(9, (1, 2), size_weighted=False)[1].plan
    assert unweighted.t[unweighted.pair_slots].tolist() == [0.5, 0.5]


def test_ratios_per_cutoff():
    stages = plan_stages(41, (3, 6), ratio=(1.0, 0.5))
    assert stages[0].plan.merged_length == 22 and stages[1].plan.merged_length == 22 - 5  # 19 pairs, then 5 of 10
    with pytest.raises(ValueError, match="2 merge ratios for 1 cutoffs"):
        plan_stages(41, (3,), ratio=(1.0, 0.5))


def test_slerp_dir_keeps_slerps_direction_with_the_mean_norm():
    a, b = torch.randn(20, 16) * 4, torch.randn(20, 16)
    out = slerp_dir(a, b, 0.5)
    torch.testing.assert_close(out.norm(dim=-1), (a.norm(dim=-1) + b.norm(dim=-1)) / 2)
    unit_slerp = slerp(torch.nn.functional.normalize(a, dim=-1), torch.nn.functional.normalize(b, dim=-1), 0.5)
    torch.testing.assert_close(torch.nn.functional.normalize(out, dim=-1), unit_slerp, atol=1e-5, rtol=1e-5)
    assert torch.equal(slerp_dir(a, b, 0.0), a) and torch.equal(slerp_dir(a, b, 1.0), b)
    assert torch.isfinite(slerp_dir(a, torch.zeros_like(a), 0.5)).all()


@settings(max_examples=150, deadline=None)
@given(length=st.integers(1, 60), keep_start=st.integers(0, 6), keep_end=st.integers(0, 6),
       ratio=st.floats(0, 1), keep_top=st.integers(0, 8), seed=st.integers(0, 10_000))
def test_attention_choice_merges_the_least_attended_pairs_and_never_the_most_attended(
        length, keep_start, keep_end, ratio, keep_top, seed):
    if keep_start + keep_end > length:
        return
    attention = torch.rand(length, generator=torch.Generator().manual_seed(seed))
    plan = plan_merge(length, keep_start, keep_end, ratio, "attention", attention=attention, keep_top=keep_top)
    top = set(attention.topk(min(keep_top, length)).indices.tolist()) if keep_top else set()
    merged = [g for g in plan.slot_items if len(g) == 2]
    assert not top & {i for g in merged for i in g}  # the most-attended tokens stay alone
    lead = min(max(keep_start, 1), length)
    end = max(length - max(keep_end, 1), lead)
    grid = [(i, i + 1) for i in range(lead, end - 1, 2)]
    assert all(g in grid for g in merged)
    eligible = [g for g in grid if not top & set(g)]
    assert len(merged) == min(math.floor(ratio * len(grid) + 0.5), len(eligible))
    if merged:  # every merged pair is attended no more than any eligible pair left alone
        worst_merged = max(float(attention[list(g)].max()) for g in merged)
        left = [float(attention[list(g)].max()) for g in eligible if g not in merged]
        assert all(worst_merged <= score for score in left)


@settings(max_examples=100, deadline=None)
@given(length=st.integers(1, 40), reach=st.integers(0, 6), seed=st.integers(0, 10_000))
def test_reach_ranks_each_item_with_the_most_attended_near_it(length, reach, seed):
    attention = torch.rand(length, generator=torch.Generator().manual_seed(seed))
    spread = spread_attention(attention, reach)
    assert spread.shape == attention.shape
    for i in range(length):
        assert spread[i] == attention[max(0, i - reach): i + reach + 1].max()


def test_reach_keeps_the_words_around_an_attended_token_together():
    # One token draws the attention: alone it keeps only its own pair; with reach 2 its neighbours rank with it.
    attention = torch.full((20,), 0.01)
    attention[10] = 0.9
    def pairs(reach):  # 5 of the 9 eligible pairs
        return choose_pairs(20, ratio=0.6, choice="attention", attention=attention, reach=reach).tolist()

    assert pairs(0) == [1, 3, 5, 7, 11]  # only (9, 10) holds the attended token
    assert pairs(2) == [1, 3, 5, 13, 15]  # (7, 8) and (11, 12) are within reach
    spread = spread_attention(attention, 2)  # with no budget, ranking by the spread score is the same thing
    assert pairs(2) == choose_pairs(20, ratio=0.6, choice="attention", attention=spread).tolist()


def test_reach_ranks_the_pairs_but_the_kept_budget_is_the_most_attended_tokens_themselves():
    # Two peaks. Spread by reach 2, the first covers items 8..12 at 0.9, so a budget of 2 taken from the spread
    # score would sit on that plateau and leave the second peak free to merge; taken from what each item receives
    # it keeps both peaks.
    attention = torch.full((20,), 0.01)
    attention[10], attention[16] = 0.9, 0.5
    merged = choose_pairs(20, ratio=1.0, choice="attention", attention=attention, keep_top=2, reach=2).tolist()
    assert merged == [1, 3, 5, 7, 11, 13, 17]  # every eligible pair but (9, 10) and (15, 16)


def test_cosine_share_mixes_the_pair_ranking_by_rank():
    # 10 items, grid pairs (1,2), (3,4), (5,6), (7,8): attention prefers to merge (1,2) then (3,4); the cosine says
    # (7,8) and (5,6) are the most alike.
    attention = torch.tensor([9.0, 0.1, 0.1, 0.2, 0.2, 0.3, 0.3, 0.4, 0.4, 9.0])
    similarity = torch.tensor([0.0, 0.1, 0.0, 0.2, 0.0, 0.8, 0.0, 0.9, 0.0])
    pairs = lambda share, count=2: choose_pairs(10, ratio=count / 4, choice="attention", attention=attention,
                                                similarity=similarity, cosine_share=share).tolist()
    assert pairs(0.0) == [1, 3]  # attention alone: the least attended
    assert pairs(1.0) == [5, 7]  # the cosine alone: the most alike
    assert pairs(0.5, 1) == [1]  # ranks 0 + 3 and 3 + 0 tie at 1.5 with 1 + 2 and 2 + 1: the earliest pair wins
    assert pairs(0.25, 1) == [1] and pairs(0.75, 1) == [7]
    assert pairs(0.0) == choose_pairs(10, ratio=0.5, choice="attention", attention=attention).tolist()
    with pytest.raises(ValueError, match="needs the adjacent similarities"):
        choose_pairs(10, choice="attention", attention=attention, cosine_share=0.5)
    assert (share_ranks(torch.tensor([0.3, 0.1, 0.2, 0.1])) * 3).tolist() == [3, 0, 2, 1]


def test_a_layer_merged_twice_makes_groups_of_four_that_weigh_their_tokens_alike():
    """Groups: the second round at one layer pairs the first round's slots at t = 2 / (2 + 2), so with lerp a group
    of four is the plain mean of its tokens, and with slerp-dir its norm is the mean of their norms."""
    x = torch.randn(1, 10, 16, generator=torch.Generator().manual_seed(3))
    first, second = plan_stages(10, (2, 2))
    assert second.slot_tokens == [(0,), (1, 2, 3, 4), (5, 6, 7, 8), (9,)]
    for method in ("lerp", "slerp-dir"):
        merged = apply_plan(apply_plan(x, first.plan, method), second.plan, method)
        group = x[0, 1:5]
        if method == "lerp":
            assert torch.allclose(merged[0, 1], group.mean(0), atol=1e-6)
        else:
            assert merged[0, 1].norm() == pytest.approx(group.norm(dim=-1).mean().item(), rel=1e-5)
        assert torch.equal(merged[0, 0], x[0, 0]) and torch.equal(merged[0, 3], x[0, 9])  # singles stay whole
