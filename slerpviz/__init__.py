"""slerpviz: merge consecutive tokens with SLERP inside an LLM's forward pass, and see what it does."""

from .engine import MergingEngine
from .forward import Session
from .generation import Run, Step, Trace
from .merge import MergePlan, apply_plan, lerp, seed2024, slerp
from .pairs import plan_merge, plan_stages
from .patch import apply, merging, remove
from .settings import MergeSettings, Sampling

__all__ = [
    "MergePlan", "MergeSettings", "MergingEngine", "Run", "Sampling", "Session", "Step", "Trace",
    "apply", "apply_plan", "lerp", "merging", "plan_merge", "plan_stages", "remove", "seed2024", "slerp",
]
