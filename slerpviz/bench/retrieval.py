"""Does the answer survive the merge? Synthetic long-context retrieval, in the spirit of needle-in-a-haystack and RULER.

A prompt is filler prose (any text: the default fidelity texts, nothing to download) with a needle hidden at a chosen
depth and a question at the end that the needle answers. The base model and each merged variant continue the same
prompt greedily; a trial is correct when the exact answer appears in the continuation.

Tasks:
- `passkey`: "The pass key is 48213. Remember it. 48213 is the pass key." at the depth; asked at the end.
- `multikey`: several "The special magic number for <word> is <7 digits>." lines through the filler; the one at the
  asked depth is queried, the others are distractors.

Prompts are built from token ids, piece by piece, so their length is exact; the needle is inserted at the sentence
boundary of the filler nearest the asked depth. Raw text, no chat template: the question ends in the words that
start the answer ("The pass key is"), which a small instruct model completes reliably.
"""

from __future__ import annotations

import random
import re
import statistics
from dataclasses import dataclass

import torch

from ..engine import MergeSettings, MergingEngine, Sampling, Trace
from .limits import Shape, prefill_flops

TASKS = ("passkey", "multikey")
# Words naming the multikey needles: common, single-token-ish, unrelated to the filler's topics.
KEY_WORDS = ("apple", "river", "candle", "violet", "harbor", "pencil", "falcon", "marble", "lantern", "meadow",
             "copper", "saddle", "orchid", "thunder", "basket", "silver")
# multikey: needles besides the one asked for. With 3 the 135M base model picked a distractor a third of the
# time at 256 tokens; the test is whether merging loses the answer, so the base must mostly find it.
DISTRACTORS = 2

RETRIEVAL_COLUMNS = ("task", "length", "depth", "sample", "variant", "correct", "answer", "output",
                     "needle_start", "needle_end", "needle_merged", "prefill_s", "flop_limit", "merged_length")
SUMMARY_COLUMNS = ("task", "variant", "length", "depth", "n", "correct", "accuracy", "flop_limit", "prefill_s",
                   "needle_merged")

INSTRUCTIONS = {
    "passkey": "There is an important pass key hidden inside a lot of irrelevant text. Find it and remember it. "
               "I will ask you about the pass key.\n\n",
    "multikey": "Some special magic numbers are hidden inside a lot of irrelevant text. Find them and remember them. "
                "I will ask you about one of them.\n\n",
}


@dataclass(frozen=True)
class Prompt:
    """One retrieval prompt: token ids [1, length], the answer, and where the asked needle sits."""

    task: str
    length: int
    depth: float
    sample: int
    ids: torch.Tensor
    answer: str
    needle_start: int  # token index of the asked needle's first token
    needle_end: int  # one past its last token

    @property
    def needle_depth(self) -> float:
        """Where the needle actually sits, as a share of the prompt."""
        return self.needle_start / self.length


def passkey_pieces(rng: random.Random) -> tuple[str, str, str]:
    key = str(rng.randint(10000, 99999))
    needle = f"\n\nThe pass key is {key}. Remember it. {key} is the pass key."
    return needle, "\n\nWhat is the pass key? The pass key is", key


def multikey_pieces(rng: random.Random) -> tuple[str, list[str], str, str]:
    """The asked needle, the distractor needles, the question and the answer."""
    words = rng.sample(KEY_WORDS, DISTRACTORS + 1)
    numbers = [str(rng.randint(1000000, 9999999)) for _ in words]
    lines = [f"\n\nThe special magic number for {w} is {n}." for w, n in zip(words, numbers)]
    question = f"\n\nWhat is the special magic number for {words[0]}? The special magic number for {words[0]} is"
    return lines[0], lines[1:], question, numbers[0]


def sentence_ends(tokens: list[str]) -> list[int]:
    """Indices i where a needle may go before filler token i: after a token ending a sentence."""
    return [i + 1 for i, text in enumerate(tokens) if text.rstrip().endswith((".", "!", "?"))]


def nearest(candidates: list[int], target: int, default: int) -> int:
    return min(candidates, key=lambda c: (abs(c - target), c)) if candidates else default


class Haystack:
    """Filler token ids as a ring over the concatenated texts, so samples start at different places."""

    def __init__(self, tokenizer, texts: list[str]):
        self.tokenizer = tokenizer
        joined = "\n\n".join(t.strip() for t in texts)
        self.ids = tokenizer(joined, add_special_tokens=False)["input_ids"]
        self.strings = tokenizer.batch_decode([[i] for i in self.ids])

    def __len__(self) -> int:
        return len(self.ids)

    def take(self, start: int, count: int) -> tuple[list[int], list[str]]:
        """`count` filler tokens ending near `start`, wrapping around; they end at a sentence end when they can,
        so the question does not read as the end of a broken sentence."""
        if count > len(self.ids):
            raise ValueError(f"the filler text has {len(self.ids)} tokens; a prompt needs {count} of them: "
                             f"give longer --texts or shorter --lengths")
        end = nearest([e % len(self.ids) for e in sentence_ends(self.strings)], start % len(self.ids), 0)
        index = [(end - count + k) % len(self.ids) for k in range(count)]
        return [self.ids[i] for i in index], [self.strings[i] for i in index]

    def encode(self, text: str) -> list[int]:
        return self.tokenizer(text, add_special_tokens=False)["input_ids"]


def build_prompt(haystack: Haystack, task: str, length: int, depth: float, sample: int, seed: int = 0) -> Prompt:
    """A prompt of exactly `length` tokens with the asked needle at `depth` (0 = just after the instructions, 1 =
    just before the question) of the filler, at the nearest sentence boundary."""
    if task not in TASKS:
        raise ValueError(f"unknown task {task!r}; choose from {', '.join(TASKS)}")
    if not 0 <= depth <= 1:
        raise ValueError(f"depth {depth!r} must be between 0 and 1")
    rng = random.Random(f"{seed}/{task}/{length}/{depth}/{sample}")
    if task == "passkey":
        needle, question, answer = passkey_pieces(rng)
        distractors: list[str] = []
    else:
        needle, distractors, question, answer = multikey_pieces(rng)
    head = [*_bos(haystack.tokenizer), *haystack.encode(INSTRUCTIONS[task])]
    needle_ids = haystack.encode(needle)
    distractor_ids = [haystack.encode(d) for d in distractors]
    tail = haystack.encode(question)
    filler_count = length - len(head) - len(needle_ids) - sum(map(len, distractor_ids)) - len(tail)
    if filler_count < 1:
        raise ValueError(f"length {length} is too short for the {task} task's instructions, needle and question")
    filler, strings = haystack.take(rng.randrange(len(haystack)), filler_count)
    ends = [e for e in sentence_ends(strings) if e < filler_count] + [0, filler_count]
    at = nearest(ends, round(depth * filler_count), round(depth * filler_count))
    # Distractors go at random sentence boundaries away from the asked needle, inserted from the back so earlier
    # offsets stay valid.
    inserts = [(at, needle_ids, True)]
    others = [e for e in ends if abs(e - at) > 8] or ends
    inserts += [(rng.choice(others), ids, False) for ids in distractor_ids]
    inserts.sort(key=lambda item: (item[0], not item[2]), reverse=True)
    body = list(filler)
    for position, ids, _ in inserts:
        body[position:position] = ids
    start = len(head) + at + sum(len(ids) for position, ids, asked in inserts if not asked and position < at)
    # A distractor at the very same boundary goes after the asked needle (sorted so), which leaves `start` right.
    ids = torch.tensor([head + body + tail])
    assert ids.shape[-1] == length, (ids.shape, length)
    return Prompt(task, length, depth, sample, ids, answer, start, start + len(needle_ids))


def _bos(tokenizer) -> list[int]:
    """The tokenizer's own start token when it adds one (Llama, Mistral); none for SmolLM2 and Qwen2."""
    probe = tokenizer("a")["input_ids"]
    bos = getattr(tokenizer, "bos_token_id", None)
    return [bos] if bos is not None and probe[:1] == [bos] else []


# A pass-key needle as passkey_pieces writes it, or any "pass key is <digits>" a user wrote.
_NEEDLE = re.compile(r"The pass key is (\d+)\. Remember it\. \1 is the pass key\.|pass key is (\d+)")


@dataclass(frozen=True)
class Needle:
    """A pass key found in a prompt: the answer and the tokens [start, end) that state it."""

    answer: str
    start: int
    end: int


def find_passkey(tokens: list[str]) -> Needle | None:
    """The first pass-key statement in a prompt given as token strings, or None.

    Skips a statement that is the prompt's own question ("The pass key is" at the very end has no digits)."""
    text = "".join(tokens)
    match = _NEEDLE.search(text)
    if match is None:
        return None
    bounds, offset = [], 0
    for token in tokens:
        bounds.append(offset)
        offset += len(token)
    start = max(i for i, b in enumerate(bounds) if b <= match.start())
    end = max(i for i, b in enumerate(bounds) if b < match.end()) + 1
    return Needle(match.group(1) or match.group(2), start, end)


def is_correct(answer: str, output: str) -> bool:
    """The exact answer appears in the continuation, not as part of a longer number."""
    digits = "".join(c if c.isdigit() else " " for c in output).split()
    return answer in digits


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
    if not trace.groups or end <= start:
        return 0.0
    merged = {token for slot in trace.groups[-1] if len(slot) > 1 for token in slot}
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

