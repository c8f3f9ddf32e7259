"""Scheduler names (engine.protocol.SCHEDULERS) mapped to diffusers scheduler classes."""

from __future__ import annotations

import copy
from collections import OrderedDict
from typing import Any

import torch
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


_PREPARED_KEPT = 64
_prepared: OrderedDict[tuple[str, int, int, str], tuple[Any, SchedulerMixin]] = OrderedDict()
"""(kind, id of the model's scheduler config, steps, device) -> (that config, a scheduler with its timesteps set).
Keeping the config keeps its id from being reused while the entry exists."""


def scheduler_for(name: str, base_config: Any, steps: int, device: torch.device) -> SchedulerMixin:
    """A fresh scheduler of the named kind with `set_timesteps(steps, device=device)` done.

    Every request in a batch needs a scheduler of its own. Building one and computing its timesteps costs
    1-3 ms of CPU, while the GPU waits for the batch's first UNet call, so each is a copy of one kept per
    kind, model config, step count and device (a quarter of the time): the same state as a new one.
    """
    key = (name, id(base_config), steps, str(device))
    entry = _prepared.get(key)
    if entry is None or entry[0] is not base_config:
        prepared = make_scheduler(name, base_config)
        prepared.set_timesteps(steps, device=device)
        entry = _prepared[key] = (base_config, prepared)
        while len(_prepared) > _PREPARED_KEPT:
            _prepared.popitem(last=False)
    else:
        _prepared.move_to_end(key)
    return copy.deepcopy(entry[1])
