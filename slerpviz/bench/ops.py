"""Counting what a piece of work asks of the host: aten ops, and the ones that make the host wait for the device.

On a GPU, every value read back to the host (`.item()`, `int(t)`, `bool(t)`, a data-dependent shape from `nonzero`,
a copy to the CPU) stalls the launch queue until the device catches up; a merge that does it per pair choice or
per layer is host-bound however fast its kernels are. These ops are the same on the CPU, so counting them here is
a proxy that needs no GPU: a TorchDispatchMode sees every aten op a block dispatches, on any device.
"""

from __future__ import annotations

from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode

from ..decode import acquire
from ..settings import MergeSettings
from .schedules import BASE

# Ops whose result the host must wait for: a scalar read, or an output whose shape depends on the values.
SYNC_OPS = frozenset({
    "aten::_local_scalar_dense", "aten::nonzero", "aten::masked_select", "aten::unique_dim", "aten::_unique2",
    "aten::unique_consecutive", "aten::is_nonzero", "aten::equal",
})


class OpCounter(TorchDispatchMode):
    """Counts every aten op dispatched inside the block; `syncs` counts those in SYNC_OPS, and copies from a device
    to the CPU."""

    def __init__(self):
        super().__init__()
        self.ops: Counter = Counter()
        self.device_to_host = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        name = func._schema.name
        self.ops[name] += 1
        if name in ("aten::_to_copy", "aten::copy_"):
            source = args[1] if name == "aten::copy_" else args[0]
            target = (args[0].device if name == "aten::copy_"
                      else torch.device(kwargs.get("device") or source.device))
            if isinstance(source, torch.Tensor) and source.device.type != "cpu" and target.type == "cpu":
                self.device_to_host += 1
        return func(*args, **kwargs)

    @property
    def total(self) -> int:
        return sum(self.ops.values())

    @property
    def syncs(self) -> int:
        return sum(count for name, count in self.ops.items() if name in SYNC_OPS) + self.device_to_host

    def sync_ops(self) -> dict[str, int]:
        return {name: count for name, count in self.ops.items() if name in SYNC_OPS}


def profile_merge(engine, hidden: torch.Tensor, settings) -> dict:
    """One merge of hidden states [1, L, d] at the settings' cutoffs (engine.merge_only), counted: aten ops and
    host syncs, and on a GPU the kernels it launched and their summed time on the device (torch.profiler)."""
    engine.merge_only(hidden, settings)  # warm: first calls initialise things once
    with OpCounter() as counter:
        engine.merge_only(hidden, settings)
    work = {"merge_ops": counter.total, "merge_syncs": counter.syncs}
    if hidden.device.type == "cuda":
        work.update(device_kernels(lambda: engine.merge_only(hidden, settings), "merge"))
    return work


def profile_prefill(engine, ids: torch.Tensor, settings) -> dict:
    """One cached prefill of the prompt `ids` [1, L] under `settings`, on the path the engine runs now (eager or
    compiled, engine.prefill_path), counted: aten ops (outermost calls) and host syncs, and on a GPU its kernels and
    their time. torch.profiler counts them, as a dispatch mode would stop torch.compile. A compiled layer dispatches
    only what inductor did not fuse (matmuls, attention), so its ops fall as its launches do on a GPU."""
    from torch.profiler import ProfilerActivity, profile

    with torch.inference_mode():
        engine.prefill(ids, settings)  # warm
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            engine.prefill(ids, settings)
        ops = [e for e in prof.events() if e.name.startswith("aten::") and not _inside_aten(e)]
        work = {"prefill_ops": len(ops), "prefill_syncs": sum(e.name in SYNC_OPS for e in ops)}
        if ids.device.type == "cuda":
            work.update(device_kernels(lambda: engine.prefill(ids, settings), "prefill"))
    return work


def _inside_aten(event) -> bool:
    """Whether a profiled event runs inside another aten op (a nested call, which a dispatch mode does not count)."""
    parent = event.cpu_parent
    while parent is not None:
        if parent.name.startswith("aten::"):
            return True
        parent = parent.cpu_parent
    return False


def profile_decode_step(engine, ids: torch.Tensor, settings, decode: str = "dynamic", head: bool = True) -> dict:
    """One cached decode step after the prompt `ids` [1, L] under `settings`, counted: aten ops and host syncs.
    The token fed is the greedy one, left on the device: reading it back is the sampler's one sync, not the
    step's. A static or compiled decode is counted as its uncompiled static step (what a CUDA graph replays);
    without `head`, the patch's static step, which ends at the final norm (the prompt's greedy token is fed again)."""
    with torch.inference_mode():
        session = engine.prefill(ids, settings)
        token = session.logits.argmax(-1, keepdim=True)
        if decode == "dynamic":
            step = session.decode
        else:
            decoder = acquire(session, 4, compiled=False, head=head)
            decoder.warm_up()
            step = decoder.step
        step(token)  # warm
        token = step(token).argmax(-1, keepdim=True) if head else token
        with OpCounter() as counter:
            step(token)
        if decode != "dynamic":
            decoder.release()
    return {"decode_ops": counter.total, "decode_syncs": counter.syncs}


def device_kernels(work, prefix: str) -> dict:
    """Kernels (and copies) `work()` launches on the GPU, and their summed device time in ms, from torch.profiler."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    with torch.inference_mode(), profile(activities=[ProfilerActivity.CPU, ProfilerActivity.CUDA]) as prof:
        work()
        torch.cuda.synchronize()
    kernels = [e for e in prof.events() if e.device_type == DeviceType.CUDA]
    return {f"{prefix}_kernels": len(kernels),
            f"{prefix}_gpu_ms": sum(e.time_range.elapsed_us() for e in kernels) / 1000}


def host_work(engine, ids: torch.Tensor, variants: list[tuple[str, MergeSettings]], decodes: tuple[str, ...],
              prefills: tuple[str, ...] = ("eager",)) -> dict[tuple[str, str, str], dict]:
    """Ops and host syncs of one merge (none for base), one cached decode step and one prefill, outside any timed
    run, by (variant, decode, prefill). Each merge is counted once per variant (eager: a compiled one shows in its
    prefill's ops), each step once per variant and kind of step (the static, graph and compiled decodes all run the
    static step: a graph replays what it recorded), each prefill once per variant and prefill path."""
    kinds = {decode: "dynamic" if decode == "dynamic" else "static" for decode in decodes}
    everyone = [(BASE, MergeSettings()), *variants]
    with engine.prefill_path("eager"):  # a dispatch mode counts these, and would stop a compiled merge
        steps = {(name, kind): profile_decode_step(engine, ids, settings, kind)
                 for name, settings in everyone for kind in set(kinds.values())}
        hidden = torch.randn(1, ids.shape[-1], engine.config.hidden_size, dtype=engine.dtype, device=engine.device)
        merges = {name: profile_merge(engine, hidden, settings) for name, settings in variants}
    prompts = {}
    for prefill in prefills:
        with engine.prefill_path(prefill):
            prompts.update({(name, prefill): profile_prefill(engine, ids, settings) for name, settings in everyone})
    return {(name, decode, prefill): {**steps[name, kind], **merges.get(name, {}), **prompts[name, prefill]}
            for name, _ in everyone for decode, kind in kinds.items() for prefill in prefills}
