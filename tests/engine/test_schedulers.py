"""engine/schedulers.py: each request's scheduler is a copy of a prepared one, in the state of a new one."""

from __future__ import annotations

import inspect
from pathlib import Path
from typing import Any

import pytest
import torch
from diffusers import PNDMScheduler
from diffusers.schedulers.scheduling_utils import SchedulerMixin

from engine.errors import UserError
from engine.protocol import SCHEDULERS
from engine.schedulers import make_scheduler, scheduler_for

CPU = torch.device("cpu")


@pytest.fixture(scope="module")
def base_config(tiny_root: Path) -> Any:
    """The tiny model's own scheduler config (a PNDM one, as in Stable Diffusion 1.5 checkpoints)."""
    return PNDMScheduler.from_pretrained(tiny_root / "txt2img", subfolder="scheduler").config


def _denoise(scheduler: SchedulerMixin) -> list[torch.Tensor]:
    """Every step's output for fixed model outputs and a fixed generator."""
    generator = torch.Generator().manual_seed(7)
    sample = torch.randn((1, 4, 8, 8), generator=generator)
    kwargs = {"generator": generator} if "generator" in inspect.signature(scheduler.step).parameters else {}
    outputs = []
    for k, t in enumerate(scheduler.timesteps):
        model_input = scheduler.scale_model_input(sample, t)
        noise = torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(k)) + 0.01 * model_input
        sample = scheduler.step(noise, t, sample, **kwargs, return_dict=False)[0]
        outputs.append(sample)
    return outputs


@pytest.mark.parametrize("name", sorted(SCHEDULERS))
def test_a_copied_scheduler_denoises_like_a_new_one(name: str, base_config: Any) -> None:
    fresh = make_scheduler(name, base_config)
    fresh.set_timesteps(12, device=CPU)
    expected = _denoise(fresh)

    first = scheduler_for(name, base_config, 12, CPU)
    second = scheduler_for(name, base_config, 12, CPU)
    assert first is not second
    assert type(first) is type(fresh)
    assert torch.equal(first.timesteps, fresh.timesteps)
    for got in (_denoise(first), _denoise(second), _denoise(scheduler_for(name, base_config, 12, CPU))):
        assert len(got) == len(expected)
        for a, b in zip(got, expected, strict=True):
            assert torch.equal(a, b)  # stepping one copy left nothing behind in the next


def test_each_step_count_and_config_gets_its_own_timesteps(base_config: Any) -> None:
    assert len(scheduler_for("euler", base_config, 5, CPU).timesteps) == 5
    assert len(scheduler_for("euler", base_config, 9, CPU).timesteps) == 9
    other = dict(base_config) | {"num_train_timesteps": 500}
    new = make_scheduler("euler", other)
    new.set_timesteps(5, device=CPU)
    assert torch.equal(scheduler_for("euler", other, 5, CPU).timesteps, new.timesteps)
    assert not torch.equal(scheduler_for("euler", base_config, 5, CPU).timesteps, new.timesteps)


def test_an_unknown_scheduler_is_still_a_user_error(base_config: Any) -> None:
    with pytest.raises(UserError, match="Unknown scheduler `warp`"):
        scheduler_for("warp", base_config, 5, CPU)
