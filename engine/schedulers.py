"""Scheduler names (engine.protocol.SCHEDULERS) mapped to diffusers scheduler classes."""

from __future__ import annotations

from typing import Any

from diffusers import (
    DDIMScheduler,
    DPMSolverMultistepScheduler,
    EulerAncestralDiscreteScheduler,
    EulerDiscreteScheduler,
    LCMScheduler,
    LMSDiscreteScheduler,
    PNDMScheduler,
    UniPCMultistepScheduler,
)
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from engine.errors import UserError
from engine.protocol import SCHEDULERS

_CLASSES: dict[str, tuple[type[SchedulerMixin], dict[str, Any]]] = {
    "dpmpp_2m_karras": (DPMSolverMultistepScheduler, {"use_karras_sigmas": True, "algorithm_type": "dpmsolver++"}),
    "dpmpp_2m": (DPMSolverMultistepScheduler, {"use_karras_sigmas": False, "algorithm_type": "dpmsolver++"}),
    "euler_a": (EulerAncestralDiscreteScheduler, {}),
    "euler": (EulerDiscreteScheduler, {}),
    "ddim": (DDIMScheduler, {}),
    "lms": (LMSDiscreteScheduler, {}),
    "pndm": (PNDMScheduler, {"skip_prk_steps": True}),
    "unipc": (UniPCMultistepScheduler, {}),
    "lcm": (LCMScheduler, {}),  # for few-step models (an LCM-LoRA fused in): 2-8 steps, guidance 1-2
}
assert set(_CLASSES) == set(SCHEDULERS), "every protocol scheduler name needs a class"


def make_scheduler(name: str, base_config: Any) -> SchedulerMixin:
    """A fresh scheduler of the named kind, built from the model's own scheduler config."""
    try:
        cls, overrides = _CLASSES[name]
    except KeyError:
        raise UserError(f"Unknown scheduler `{name}`. Choose one of: {', '.join(SCHEDULERS)}.") from None
    return cls.from_config(base_config, **overrides)
