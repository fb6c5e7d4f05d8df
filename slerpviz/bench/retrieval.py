"""Does the answer survive the merge? Synthetic long-context retrieval, in the spirit of needle-in-a-haystack and RULER.

The prompts and their scoring are slerpviz.tasks' (the page shows the same prompts): filler prose with a needle at a
chosen depth and a question at the end. The base model and each merged variant continue the same prompt greedily; a
trial is correct when the exact answer appears in the continuation. This module runs the trials and sums them up.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass

import torch

from ..engine import MergeSettings, MergingEngine, Sampling, Trace
from ..tasks import TASKS, Haystack, build_prompt, is_correct
from .limits import Shape, prefill_flops

RETRIEVAL_COLUMNS = ("task", "length", "depth", "sample", "variant", "correct", "answer", "output",
                     "needle_start", "needle_end", "needle_merged", "prefill_s", "flop_limit", "merged_length")
SUMMARY_COLUMNS = ("task", "variant", "length", "depth", "n", "correct", "accuracy", "flop_limit", "prefill_s",
                   "needle_merged")


def new_tokens_for(answer: str) -> int:
    """Room for a space, one token per digit (the worst case) and a little slack."""
    return len(answer) + 4


# ----------------------------------------------------------------------------------------------------------------
# Running
# ----------------------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class RetrievalPlan:
    tasks: tuple[str, ...]
    lengths: tuple[int, ...]
    depths: tuple[float, ...]
    samples: int
    variants: tuple[tuple[str, MergeSettings], ...]  # (label, settings); base is always run first
    seed: int = 0


def greedy(engine: MergingEngine, ids: torch.Tensor, settings: MergeSettings, new_tokens: int) -> Trace:
    """The trace of the greedy continuation: its text, prefill seconds, the length each layer saw, the slots."""
    run = engine.start(ids.to(engine.device), settings, Sampling(max_new_tokens=new_tokens))
    for _ in run:
        pass
    return run.trace


def merged_share(trace: Trace, start: int, end: int) -> float:
    """Share of the prompt tokens [start, end) (the asked needle) that the last merge stage put in a slot with
    others: 0 where none of them merged."""
    if not trace.slot_tokens or end <= start:
        return 0.0
    merged = {token for slot in trace.slot_tokens[-1] if len(slot) > 1 for token in slot}
    return sum(token in merged for token in range(start, end)) / (end - start)


def task_list(text: str | None) -> tuple[str, ...]:
    """"passkey, multikey" -> ("passkey", "multikey"); None -> every task; an empty list is refused (it once meant every
    task). Checked by check_prompts."""
    if text is None:
        return TASKS
    tasks = tuple(t for t in text.replace(" ", "").split(",") if t)
    if not tasks:
        raise ValueError(f"an empty list ({text!r}): give at least one task, comma-separated, like "
                         f"{','.join(TASKS)}")
    return tasks


def check_prompts(engine: MergingEngine, tasks: tuple[str, ...], lengths: tuple[int, ...],
                  depths: tuple[float, ...]) -> None:
    """Refuse prompts that cannot be built or run: unknown tasks, depths outside [0, 1], lengths beyond the context."""
    context = getattr(engine.config, "max_position_embeddings", None)
    for length in lengths:
        if context is not None and length + 16 > context:
            raise ValueError(f"length {length} plus the answer does not fit the model's context of {context} tokens")
    for task in tasks:
        if task not in TASKS:
            raise ValueError(f"unknown task {task!r}; choose from {', '.join(TASKS)}")
    for depth in depths:
        if not 0 <= depth <= 1:
            raise ValueError(f"depth {depth!r} must be between 0 and 1")


def check_plan(engine: MergingEngine, plan: RetrievalPlan) -> None:
    """Refuse what cannot run before running anything: the prompts, then every variant's settings."""
    check_prompts(engine, plan.tasks, plan.lengths, plan.depths)
    for label, settings in plan.variants:
        engine.validate(min(plan.lengths), settings, Sampling(max_new_tokens=16))


def run_retrieval(engine: MergingEngine, haystack: Haystack, plan: RetrievalPlan, log=print) -> list[dict]:
    """One row per (prompt, variant): base first, then every merged variant on the very same prompt."""
    check_plan(engine, plan)
    for task in plan.tasks:  # a filler too short or a length too short fails now, not an hour in
        for length in plan.lengths:
            build_prompt(haystack, task, length, plan.depths[0], 0, plan.seed)
    shape = Shape.from_config(engine.config, engine.dtype)
    engine.warm_up()
    rows = []
    for task in plan.tasks:
        for length in plan.lengths:
            log(f"retrieval: {task} at {length} tokens, {len(plan.depths)} depths x {plan.samples} samples, "
                f"{1 + len(plan.variants)} variants")
            base_flops = prefill_flops(shape, [length] * engine.num_layers)
            for depth in plan.depths:
                for sample in range(plan.samples):
                    prompt = build_prompt(haystack, task, length, depth, sample, plan.seed)
                    for label, settings in (("base", MergeSettings()), *plan.variants):
                        trace = greedy(engine, prompt.ids, settings, new_tokens_for(prompt.answer))
                        lengths = trace.seq_len_per_layer
                        rows.append({
                            "task": task, "length": length, "depth": depth, "sample": sample, "variant": label,
                            "correct": int(is_correct(prompt.answer, trace.text)), "answer": prompt.answer,
                            "output": trace.text, "needle_start": prompt.needle_start,
                            "needle_end": prompt.needle_end,
                            "needle_merged": merged_share(trace, prompt.needle_start, prompt.needle_end),
                            "prefill_s": trace.prefill_s, "flop_limit": base_flops / prefill_flops(shape, lengths),
                            "merged_length": lengths[-1],
                        })
    return rows


def summarise(rows: list[dict], by: tuple[str, ...] = ("task", "variant", "length", "depth")) -> list[dict]:
    """Accuracy with its n for each group, in the order groups first appear."""
    groups: dict[tuple, list[dict]] = {}
    for row in rows:
        groups.setdefault(tuple(row[k] for k in by), []).append(row)
    return [{
        **dict(zip(by, key)),
        "n": len(members),
        "correct": sum(r["correct"] for r in members),
        "accuracy": statistics.fmean(r["correct"] for r in members),
        "flop_limit": statistics.fmean(r["flop_limit"] for r in members),
        "prefill_s": statistics.median(r["prefill_s"] for r in members),
        "needle_merged": statistics.fmean(r.get("needle_merged", 0.0) for r in members),
    } for key, members in groups.items()]


def passkey_accuracy(rows: list[dict], variant: str, min_length: int = 0) -> tuple[int, int]:
    """(correct, n) of the pass-key trials of a variant at prompt lengths of at least `min_length`."""
    trials = [r for r in rows if r["task"] == "passkey" and r["variant"] == variant and r["length"] >= min_length]
    return sum(r["correct"] for r in trials), len(trials)
