"""The changes a GPU worker sends after each step rebuild the run's trace on the page's side, and stay small."""

import pickle

from conftest import random_ids, tiny_engine
from slerpviz.app.transfer import ChangeSender, apply_change
from slerpviz.engine import MergeSettings, Sampling


def test_the_changes_rebuild_each_trace_and_do_not_grow_with_the_run():
    engine = tiny_engine("llama")
    ids = random_ids(120, seed=2)
    run = engine.start(ids, MergeSettings(cutoffs=(2,), choice="attention", ratio=0.5), Sampling(max_new_tokens=12))
    sender, rebuilt, sizes = ChangeSender(), None, []
    for _ in run:
        change = sender.change(run.trace)
        sizes.append(len(pickle.dumps(change)))
        rebuilt = apply_change(rebuilt, pickle.loads(pickle.dumps(change)))  # across a process boundary
        assert rebuilt.to_dict() == run.trace.to_dict()
    # A run marks itself finished once exhausted, after its last step: one more change says so.
    rebuilt = apply_change(rebuilt, pickle.loads(pickle.dumps(sender.change(run.trace))))
    assert rebuilt.to_dict() == run.trace.to_dict() and rebuilt.finished and len(sizes) == 12
    # The first change carries the prompt and its plan; each later one a token's worth, however long the run.
    assert max(sizes[1:]) < sizes[0] / 4
    assert max(sizes[1:]) - min(sizes[1:]) < 200
