"""Benchmarks: `python -m slerpviz.bench speed|fidelity`. The functions below are the same runs as a Python API."""

from .command import main
from .fidelity import FidelityPlan, run_fidelity, summarise
from .limits import Shape, kv_fraction_limit, layer_lengths, prefill_speedup_limit
from .speed import SpeedPlan, run_speed
from .texts import TokenText

__all__ = [
    "FidelityPlan", "Shape", "SpeedPlan", "TokenText", "kv_fraction_limit", "layer_lengths", "main",
    "prefill_speedup_limit", "run_fidelity", "run_speed", "summarise",
]
