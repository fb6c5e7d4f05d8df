"""The merge stays on the device: what it asks of the host, counted on the CPU.

On a GPU every value read back (`.item()`, `bool(t)`, `nonzero`'s data-dependent shape, a copy to the CPU) stalls
the launch queue. Issue 23 measured 22 such reads and 1,086 aten ops in the recommended merge of 1,024 tokens on
the CPU, and a merge on an H200 that spent 9.3 ms of wall time on 0.78 ms of kernels. These tests fail when a read
or a pile of small ops creeps back.
"""

import pytest
import torch

from conftest import random_ids
from slerpviz import presets
from slerpviz.bench.ops import OpCounter
from slerpviz.engine import MergeSettings
from slerpviz.pairs import plan_stages


def counted_merge(engine, length: int, settings: MergeSettings, seed: int = 0) -> OpCounter:
    hidden = torch.randn(1, length, engine.config.hidden_size, generator=torch.Generator().manual_seed(seed))
    engine.merge_only(hidden, settings)  # first calls may initialise things once
    with OpCounter() as counter:
        engine.merge_only(hidden, settings)
    return counter


def test_the_counter_sees_reads_back_to_the_host():
    x = torch.arange(6.0)
    with OpCounter() as counter:
        int(x.sum())
        torch.nonzero(x > 2)
        torch.nonzero_static(x > 2, size=3)  # no read: its shape is given
    assert counter.syncs == 2
    assert counter.sync_ops() == {"aten::_local_scalar_dense": 1, "aten::nonzero": 1}
    assert counter.total >= 5


def test_the_recommended_merge_of_1024_tokens_reads_back_at_most_one_number_per_stage(embedded):
    settings = presets.recommended(embedded.num_layers)
    counter = counted_merge(embedded, 1024, settings)
    stages = len(settings.cutoffs)
    assert counter.syncs <= stages, counter.sync_ops()
    assert counter.device_to_host == 0
    assert counter.total <= 150 * stages, counter.ops.most_common(10)


@pytest.mark.parametrize("settings", [
    MergeSettings(cutoffs=(1, 3)),
    MergeSettings(cutoffs=(1, 3), choice="uniform", ratio=(0.5, 1.0), positions="renumber", method="lerp"),
    # Without a kept budget the attention choice merges exactly the pairs its ratio asks for: the count is known.
    MergeSettings(cutoffs=(2, 4), choice="attention", ratio=0.5, attention_keep=0, attention_reach=3,
                  proportional=True),
], ids=["consecutive", "uniform", "attention-no-budget"])
def test_a_merge_whose_count_is_known_ahead_reads_nothing_back(engine, settings):
    counter = counted_merge(engine, 96, settings)
    assert counter.syncs == 0, counter.sync_ops()


@pytest.mark.parametrize("settings", [
    MergeSettings(cutoffs=(1, 3), choice="similar", ratio=(1.0, 0.5)),
    MergeSettings(cutoffs=(1, 3), choice="attention", ratio=(0.5, 1.0), attention_keep=8, cosine_share=0.5),
], ids=["similar", "attention-kept-budget"])
def test_a_merge_whose_count_depends_on_the_data_reads_one_number_per_stage(engine, settings):
    counter = counted_merge(engine, 96, settings)
    assert counter.syncs == len(settings.cutoffs), counter.sync_ops()


@pytest.mark.parametrize("choice", ["consecutive", "uniform", "attention"])
def test_a_stage_whose_count_is_known_traces_as_one_graph(engine, choice):
    # fullgraph=True fails on any graph break: a read back to the host, or Python that depends on a tensor's value.
    settings = MergeSettings(cutoffs=(2,), choice=choice, ratio=0.5, attention_keep=0, attention_reach=2)
    first = last = torch.arange(40)
    positions = torch.arange(40, dtype=torch.float32)

    def stage(hidden):
        merged = engine.merge_at_cutoff(hidden, first, last, positions, None, 2, settings, 0.5)
        return merged.hidden, merged.positions, merged.cosines

    hidden = torch.randn(1, 40, engine.config.hidden_size)
    torch._dynamo.reset()
    traced = torch.compile(stage, fullgraph=True, backend="eager")(hidden)
    for got, expected in zip(traced, stage(hidden)):
        torch.testing.assert_close(got, expected)


def test_the_device_plan_gives_the_prefill_the_same_tokens_as_a_replayed_cpu_plan(engine):
    # The engine plans on the hidden states' device; a plan made up front on the CPU (plan_stages) must agree.
    ids = random_ids(50, seed=3)
    settings = MergeSettings(cutoffs=(1, 4), ratio=(0.5, 1.0), keep_start=3, keep_end=4)
    planned = engine.prefill(ids, settings)
    replayed = engine.prefill(ids, settings, stages=plan_stages(50, (1, 4), 3, 4, (0.5, 1.0)))
    assert [s.slot_tokens for s in planned.stages] == [s.slot_tokens for s in replayed.stages]
    torch.testing.assert_close(planned.logits, replayed.logits)


def test_per_cutoff_ratios_travel_with_their_cutoffs_in_plan_stages():
    # Cutoffs given out of order: ratio 1 belongs to layer 4 and ratio 0.5 to layer 2 (issue 21, item 4).
    stages = plan_stages(40, (4, 2), ratio=(1.0, 0.5))
    assert [s.cutoff for s in stages] == [2, 4]
    eligible = 19  # pairs (1, 2) .. (37, 38): the first and last token stay alone
    assert stages[0].plan.merged_length == 40 - round(0.5 * eligible + 1e-9)
    assert stages[1].plan.merged_length < stages[0].plan.merged_length - 10  # all that remain merge at layer 4
