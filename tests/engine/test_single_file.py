"""Single-file `.safetensors` checkpoints (the original "ldm" layout) load offline and match the diffusers folder."""

from __future__ import annotations

import shutil
from pathlib import Path

import msgspec
import pytest
import torch
from diffusers import StableDiffusionPipeline
from safetensors import safe_open

from engine.config import ModelSpec
from engine.engine import Engine
from engine.errors import ConfigError, FailureReason
from engine.protocol import Failed, Task
from tests.engine.ldm_export import CLIP_PREFIX, UNET_PREFIX, VAE_PREFIX, export_single_file
from tests.engine.support import assert_near, done_arrays, final, request, run, tiny_settings


@pytest.fixture(scope="module")
def single_file(tiny_root: Path, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """The tiny txt2img weights as one ldm-layout checkpoint, as downloaded from a model site."""
    return export_single_file(tiny_root / "txt2img", tmp_path_factory.mktemp("single") / "tiny-sd.safetensors")


@pytest.fixture(scope="module")
def files_engine(tiny_root: Path, single_file: Path) -> Engine:
    """An engine with `base` (the diffusers folder), `single` (the same weights as one file) and two broken files."""
    settings = tiny_settings(tiny_root)
    config = str(tiny_root / "txt2img")
    pickle = single_file.parent / "tiny-sd.ckpt"
    pickle.write_bytes(b"not read: pickles are refused by name")
    models = {
        **settings.models,
        "single": ModelSpec(source=str(single_file), config=config),
        "gone": ModelSpec(source=str(single_file.parent / "missing.safetensors"), config=config),
        "pickle": ModelSpec(source=str(pickle), config=config),
        "noconfig": ModelSpec(source=str(single_file)),
    }
    return Engine(msgspec.structs.replace(settings, models=models))


@pytest.mark.parametrize("task", [Task.TXT2IMG, Task.IMG2IMG])
def test_single_file_checkpoint_makes_the_same_image_as_the_diffusers_folder(files_engine: Engine, task: Task) -> None:
    """A `.safetensors` source with a local `config` folder loads offline and equals the folder model exactly."""
    from_folder = done_arrays(run(files_engine, request(task, model="base", count=2)), "job")
    from_file = done_arrays(run(files_engine, request(task, model="single", count=2)), "job")
    for a, b in zip(from_file, from_folder, strict=True):
        assert_near(a, b, tolerance=0)


def test_exported_checkpoint_has_the_ldm_layout_and_round_trips_exactly(tiny_root: Path, single_file: Path) -> None:
    """The file holds only CompVis-named weights, and diffusers reads every tensor back unchanged.

    The round trip is checked twice: with the full folder as `config` (what the engine test uses) and with a copy
    holding only its json/text files, so no weight can have come from the folder instead of the file.
    """
    with safe_open(str(single_file), framework="pt") as handle:
        keys = set(handle.keys())
        assert handle.get_tensor(f"{VAE_PREFIX}decoder.mid.attn_1.q.weight").ndim == 4
    assert all(key.startswith((UNET_PREFIX, VAE_PREFIX, CLIP_PREFIX)) for key in keys)
    assert f"{UNET_PREFIX}input_blocks.0.0.weight" in keys
    assert f"{CLIP_PREFIX}text_model.embeddings.position_embedding.weight" in keys  # how diffusers spots CLIP

    folder = tiny_root / "txt2img"
    configs_only = single_file.parent / "configs-only"
    if not configs_only.exists():
        shutil.copytree(folder, configs_only, ignore=shutil.ignore_patterns("*.safetensors"))
    reference = StableDiffusionPipeline.from_pretrained(str(folder), local_files_only=True, use_safetensors=True)
    for config in (folder, configs_only):
        loaded = StableDiffusionPipeline.from_single_file(
            str(single_file), config=str(config), local_files_only=True, safety_checker=None
        )
        for component in ("unet", "vae", "text_encoder"):
            got, want = getattr(loaded, component).state_dict(), getattr(reference, component).state_dict()
            assert got.keys() == want.keys(), component
            changed = [name for name, tensor in want.items() if not torch.equal(got[name], tensor)]
            assert not changed, f"{component} ({config.name}): {changed}"


def test_missing_checkpoint_file_fails_as_model_unavailable_naming_the_file(files_engine: Engine) -> None:
    """A configured `.safetensors` path that does not exist fails the job, not the engine, and names the file."""
    end = final(run(files_engine, request(model="gone")), "job")
    assert isinstance(end, Failed)
    assert end.reason is FailureReason.MODEL_UNAVAILABLE
    assert "missing.safetensors" in end.message
    assert "does not exist" in end.message


def test_pickle_checkpoint_is_refused_before_it_is_read(files_engine: Engine) -> None:
    """A `.ckpt` source is never unpickled: loading raises ConfigError and the job fails saying to use .safetensors."""
    with pytest.raises(ConfigError, match=r"pickle checkpoint.*\.safetensors"):
        files_engine.store.sd("pickle", Task.TXT2IMG)
    end = final(run(files_engine, request(model="pickle")), "job")
    assert isinstance(end, Failed)
    assert end.reason is FailureReason.MODEL_UNAVAILABLE  # a configuration problem, not the user's input
    assert "pickle checkpoint" in end.message
    assert "Use a .safetensors file" in end.message
    assert "tiny-sd.ckpt" in end.message


def test_offline_single_file_without_config_says_to_set_config(files_engine: Engine) -> None:
    """Offline, a single file needs `config` to know its architecture; the error says which key to set."""
    end = final(run(files_engine, request(model="noconfig")), "job")
    assert isinstance(end, Failed)
    assert end.reason is FailureReason.MODEL_UNAVAILABLE
    assert "set models.noconfig.config" in end.message
