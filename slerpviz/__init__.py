"""slerpviz: merge consecutive tokens with SLERP inside an LLM's forward pass, and see what it does."""

from .engine import MergeSettings, MergingEngine, Run, Sampling, Step, Trace
from .merge import MergePlan, apply_plan, lerp, plan_merge, plan_stages, seed2024, slerp

__all__ = [
    "MergePlan", "MergeSettings", "MergingEngine", "Run", "Sampling", "Step", "Trace",
    "apply_plan", "lerp", "plan_merge", "plan_stages", "seed2024", "slerp",
]
