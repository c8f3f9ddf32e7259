"""The config file: the documented example, unknown keys, types, cross-key checks and the built-in models."""

from __future__ import annotations

import re
import tomllib
from pathlib import Path
from typing import Any

import msgspec
import pytest

from bot.config import LogConfig, QueueConfig, WebConfig, example_path, load_config
from engine.config import EngineConfig, ModelKind, ModelSpec, SafetyConfig, SpeedConfig, default_models
from engine.errors import ConfigError
from engine.protocol import Limits


def _example() -> dict[str, Any]:
    return tomllib.loads(example_path().read_text(encoding="utf-8"))


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "easelbot.toml"
    path.write_text(text, encoding="utf-8")
    return path


def _error(tmp_path: Path, text: str) -> str:
    """Load `text` as a config file and return the ConfigError message, which must name the file."""
    path = _write(tmp_path, text)
    with pytest.raises(ConfigError) as caught:
        load_config(path)
    message = str(caught.value)
    assert str(path) in message
    return message


def _defaults(struct: type[msgspec.Struct]) -> dict[str, Any]:
    """Each field's default value, keyed by name (required fields are left out)."""
    out = {}
    for field in msgspec.structs.fields(struct):
        if field.default is not msgspec.NODEFAULT:
            out[field.name] = field.default
        elif field.default_factory is not msgspec.NODEFAULT:
            out[field.name] = field.default_factory()
    return out


def test_example_file_loads_to_exactly_the_defaults() -> None:
    """config.example.toml, every key written out, gives the same Config as no file at all."""
    assert example_path().is_file()
    assert load_config(example_path()) == load_config(None)


@pytest.mark.parametrize(
    ("table", "struct"),
    [
        (("engine",), EngineConfig),
        (("engine", "safety"), SafetyConfig),
        (("engine", "speed"), SpeedConfig),
        (("limits",), Limits),
        (("queue",), QueueConfig),
        (("web",), WebConfig),
        (("log",), LogConfig),
    ],
    ids=["engine", "engine.safety", "engine.speed", "limits", "queue", "web", "log"],
)
def test_example_documents_every_field_with_its_default(table: tuple[str, ...], struct: type[msgspec.Struct]) -> None:
    """Every field of the struct is a key of its table in the example, set to the field's default."""
    data: Any = _example()
    for name in table:
        data = data[name]
    fields = set(struct.__struct_fields__)
    keys = set(data)
    assert keys == fields, f"undocumented: {sorted(fields - keys)}; unknown: {sorted(keys - fields)}"
    defaults = _defaults(struct)
    for key, value in data.items():
        if isinstance(value, dict):  # a sub-table, checked on its own
            assert key in defaults
            continue
        assert value == defaults[key], key


def test_example_models_show_every_model_key_and_the_built_in_defaults() -> None:
    """[models.sd15] and [models.x4] list every ModelSpec key (but the unset-by-default ones, which TOML cannot
    write: documented in the comment above them) and equal default_models() exactly."""
    models = _example()["models"]
    built_in = default_models()
    assert set(models) == set(built_in)
    unset = {field.name for field in msgspec.structs.fields(ModelSpec) if field.default is None}
    assert unset == {"steps", "guidance"}
    text = example_path().read_text(encoding="utf-8")
    for key in unset:
        assert re.search(rf"^#   {key} +\S", text, re.MULTILINE), f"{key} is not documented"
    for name, table in models.items():
        assert set(table) == set(ModelSpec.__struct_fields__) - unset, name
        assert msgspec.convert(table, ModelSpec) == built_in[name]


def test_example_shows_single_file_and_inpainting_checkpoints_commented_out() -> None:
    """The example documents a local single-file checkpoint and a dedicated inpainting checkpoint."""
    text = example_path().read_text(encoding="utf-8")
    commented = [line.lstrip("# ").strip() for line in text.splitlines() if line.startswith("#")]
    assert any(line.startswith("source = ") and line.endswith('.safetensors"') for line in commented)
    assert 'inpaint_source = "stable-diffusion-v1-5/stable-diffusion-inpainting"' in commented
    for word in ("unknown keys", "environment", "easelbot config check", "`tiny`"):
        assert word in text.lower() or word in text, word


def test_unknown_top_level_key_names_file_key_and_allowed_tables(tmp_path: Path) -> None:
    """A stray top-level key is an error listing the allowed tables."""
    message = _error(tmp_path, "colour = 1\n")
    assert "`colour`" in message
    for table in ("[engine]", "[limits]", "[models]"):
        assert table in message


@pytest.mark.parametrize(
    ("text", "table", "struct"),
    [
        ("[engine]\npreveiw_every = 2\n", "[engine]", EngineConfig),
        ("[engine.safety]\nenable = true\n", "[engine.safety]", SafetyConfig),
        ("[limits]\nmax_stesp = 10\n", "[limits]", Limits),
        ('[models.x]\nsource = "a/b"\nkinds = "sd"\n', "[models.x]", ModelSpec),
    ],
    ids=["engine", "engine.safety", "limits", "models.x"],
)
def test_unknown_key_in_a_table_names_file_key_and_allowed_keys(
    tmp_path: Path, text: str, table: str, struct: type[msgspec.Struct]
) -> None:
    """A misspelt key is not ignored: the error names it, its table and every allowed key."""
    message = _error(tmp_path, text)
    key = text.splitlines()[-1].split(" = ")[0]
    assert f"`{key}`" in message
    assert table in message
    for field in struct.__struct_fields__:
        assert field in message


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ('[engine]\npreview_every = "often"\n', "engine.preview_every"),
        ('[limits]\nmax_steps = "many"\n', "limits.max_steps"),
        ("[engine.safety]\nenabled = 1\n", "engine.safety.enabled"),
        ("[engine]\noffline = 0\n", "engine.offline"),
    ],
)
def test_wrong_type_names_the_dotted_key_and_the_expected_type(tmp_path: Path, text: str, key: str) -> None:
    """A value of the wrong type is an error naming `table.key` and what type it must be."""
    message = _error(tmp_path, text)
    assert f"`{key}`" in message
    assert "expected" in message


def test_a_value_outside_a_choice_lists_the_allowed_ones(tmp_path: Path) -> None:
    """A misspelt choice (a model's `kind`) names the key, the value and every allowed value."""
    message = _error(tmp_path, '[models.up]\nsource = "me/up"\nkind = "upscalr"\n')
    assert message.endswith("`models.up.kind`: invalid enum value 'upscalr'; use one of sd, upscaler.")


@pytest.mark.parametrize(
    ("text", "words"),
    [
        (
            '[engine.speed]\ncompile = "yes"\n',
            "`engine.speed.compile`: invalid enum value 'yes'; use one of true, false, \"auto\".",
        ),
        ('[engine]\ndtype = "fp16"\n', "engine.dtype = 'fp16'; use auto, float16, bfloat16 or float32."),
        ('[engine]\ndevice = "gpu"\n', "engine.device = 'gpu'; use auto, cpu, cuda or cuda:N"),
        ('[models.m]\nsource = ""\n', "models.m.source is empty; name a Hugging Face repo, a folder or a .safetensors"),
    ],
    ids=["switch", "dtype", "device", "empty-source"],
)
def test_values_the_engine_would_refuse_at_start_are_refused_by_the_check(
    tmp_path: Path, text: str, words: str
) -> None:
    """A device, dtype or switch the engine cannot use is refused when the file is read (by `config check` too),
    not by an engine that then fails to start again and again; an empty model source is refused too."""
    assert words in _error(tmp_path, text)


def test_a_compile_size_no_request_can_have_is_refused(tmp_path: Path) -> None:
    """A bucket wider than max_width (though within max_height) is refused: compiling it would only cost start-up."""
    message = _error(tmp_path, "[limits]\nmax_width = 512\nmax_height = 1024\n[engine.speed]\nsizes = [[1024, 512]]\n")
    assert "engine.speed.sizes has [1024, 512], beyond [limits] max_width x max_height = 512x1024" in message


@pytest.mark.parametrize("device", ["auto", "cpu", "cuda", "cuda:1", "mps"])
def test_every_device_torch_names_passes_the_check(tmp_path: Path, device: str) -> None:
    path = tmp_path / "easelbot.toml"
    path.write_text(f'[engine]\ndevice = "{device}"\n', encoding="utf-8")
    assert load_config(path).engine.device == device


def test_invalid_toml_names_the_file(tmp_path: Path) -> None:
    """A file that is not TOML is reported as such, with its path."""
    message = _error(tmp_path, "[engine\ndevice = cpu\n")
    assert "not valid TOML" in message


def test_missing_file_says_there_is_no_such_file(tmp_path: Path) -> None:
    """A config path that does not exist says so and points at the example."""
    path = tmp_path / "nope.toml"
    with pytest.raises(ConfigError, match="no such config file") as caught:
        load_config(path)
    assert str(path) in str(caught.value)
    assert "config.example.toml" in str(caught.value)


def test_unreadable_file_is_a_config_error(tmp_path: Path) -> None:
    """A directory or a binary file given as the config is a ConfigError, not a traceback."""
    with pytest.raises(ConfigError, match="cannot read") as caught:
        load_config(tmp_path)
    assert str(tmp_path) in str(caught.value)
    binary = tmp_path / "binary.toml"
    binary.write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(ConfigError, match="UTF-8"):
        load_config(binary)


@pytest.mark.parametrize("name", ["x4", "nope"])
def test_default_model_must_be_a_configured_sd_model(tmp_path: Path, name: str) -> None:
    """default_model naming an upscaler or an unknown model errors and lists the SD models and tiny."""
    message = _error(tmp_path, f'[engine]\ndefault_model = "{name}"\n')
    assert "engine.default_model" in message
    assert repr(name) in message
    assert "'sd15'" in message
    assert "'tiny'" in message
    assert "'x4'" not in message.split("use one of")[1]


def test_default_upscaler_must_be_a_configured_upscaler(tmp_path: Path) -> None:
    """default_upscaler naming an SD model errors and lists the upscalers and tiny."""
    message = _error(tmp_path, '[engine]\ndefault_upscaler = "sd15"\n')
    assert "engine.default_upscaler" in message
    assert "['x4', 'tiny']" in message


def test_tiny_is_accepted_as_default_model_and_upscaler(tmp_path: Path) -> None:
    """`tiny` is a built-in name, valid without a [models.tiny] table."""
    config = load_config(_write(tmp_path, '[engine]\ndefault_model = "tiny"\ndefault_upscaler = "tiny"\n'))
    assert config.engine.default_model == config.engine.default_upscaler == "tiny"


def test_preload_of_unknown_model_is_an_error(tmp_path: Path) -> None:
    """engine.preload may only name configured models (or tiny)."""
    message = _error(tmp_path, '[engine]\npreload = ["sd15", "sdxl"]\n')
    assert "'sdxl'" in message
    assert "engine.preload" in message


@pytest.mark.parametrize("suffix", [".ckpt", ".bin", ".pt", ".pth"])
def test_pickle_checkpoint_source_is_rejected(tmp_path: Path, suffix: str) -> None:
    """A pickle checkpoint can run code when loaded, so it is refused in favour of safetensors."""
    message = _error(tmp_path, f'[models.mine]\nsource = "/models/mine{suffix}"\n')
    assert "models.mine.source" in message
    assert "pickle" in message
    assert ".safetensors" in message


@pytest.mark.parametrize(
    ("table", "words"),
    [
        ('lora = "/loras/fast.pt"', ["models.fast.lora", "pickle", ".safetensors"]),
        ('lora_file = "fast.safetensors"', ["models.fast.lora_file", "without models.fast.lora"]),
        ('lora = "a/b"\nlora_file = "fast.bin"', ["models.fast.lora_file", "pickle"]),
        ('lora = "a/b"\nlora_file = "fast.txt"', ["models.fast.lora_file", ".safetensors file"]),
        ('lora = "a/b"\nkind = "upscaler"', ["models.fast.lora", "not upscalers"]),
        ('lora = "a/b"\ninpaint_source = "c/d"', ["both lora and inpaint_source", "Remove inpaint_source"]),
        ("lora_scale = 0", ["models.fast.lora_scale = 0", "above 0 and at most 4"]),
        ('scheduler = "turbo"', ["models.fast.scheduler = 'turbo'", "lcm", "euler_a"]),
        ('scheduler = "lcm"\nsteps = 60', ["models.fast.steps = 60", "use 1 to 50"]),
        ("steps = 0", ["models.fast.steps = 0", "use 1 to 100"]),
        ("guidance = 31", ["models.fast.guidance = 31", "use 0 to 30"]),
    ],
)
def test_bad_lora_and_model_defaults_name_the_key_and_what_to_do(tmp_path: Path, table: str, words: list[str]) -> None:
    """Each LoRA or per-model default mistake is refused at load, naming the key and what is allowed."""
    message = _error(tmp_path, f'[models.fast]\nsource = "a/base"\n{table}\n')
    for word in words:
        assert word in message, (word, message)


def test_the_example_few_step_model_loads_when_uncommented(tmp_path: Path) -> None:
    """The commented [models.fast] block of the example is a valid model: an LCM-LoRA with its own defaults."""
    text = example_path().read_text(encoding="utf-8")
    start = text.index("# [models.fast]")
    block = []
    for line in text[start:].splitlines():
        if not line.startswith("# ") or line == "#":
            break
        block.append(line[2:])
    config = load_config(_write(tmp_path, "\n".join(block) + "\n"))
    fast = config.models["fast"]
    assert fast.lora == "latent-consistency/lcm-lora-sdv1-5"
    assert (fast.scheduler, fast.steps, fast.guidance) == ("lcm", 4, 1.0)


def test_safetensors_single_file_source_is_accepted(tmp_path: Path) -> None:
    """A single-file .safetensors checkpoint with a config repo is a valid model."""
    text = (
        '[models.mine]\nsource = "/models/mine.safetensors"\nconfig = "stable-diffusion-v1-5/stable-diffusion-v1-5"\n'
    )
    config = load_config(_write(tmp_path, text))
    assert config.models["mine"].config == "stable-diffusion-v1-5/stable-diffusion-v1-5"


@pytest.mark.parametrize("tile", [16, 24, 100, 0])
def test_upscale_tile_must_be_a_multiple_of_8_of_at_least_32(tmp_path: Path, tile: int) -> None:
    """engine.upscale_tile below 32 or not a multiple of 8 is refused with the rule."""
    message = _error(tmp_path, f"[engine]\nupscale_tile = {tile}\nupscale_tile_overlap = 0\n")
    assert f"engine.upscale_tile = {tile}" in message
    assert "multiple of 8" in message
    assert "32" in message


@pytest.mark.parametrize("tile", [32, 64, 512])
def test_upscale_tile_in_bounds_is_accepted(tmp_path: Path, tile: int) -> None:
    """Multiples of 8 from 32 up are valid tile sides."""
    config = load_config(_write(tmp_path, f"[engine]\nupscale_tile = {tile}\nupscale_tile_overlap = 16\n"))
    assert config.engine.upscale_tile == tile


@pytest.mark.parametrize(("tile", "overlap"), [(256, 136), (256, 12), (256, -8), (64, 40)])
def test_upscale_overlap_must_be_a_multiple_of_8_up_to_half_the_tile(tmp_path: Path, tile: int, overlap: int) -> None:
    """engine.upscale_tile_overlap outside 0..tile/2 or not a multiple of 8 is refused with the range."""
    message = _error(tmp_path, f"[engine]\nupscale_tile = {tile}\nupscale_tile_overlap = {overlap}\n")
    assert f"engine.upscale_tile_overlap = {overlap}" in message
    assert f"from 0 to {tile // 2}" in message


@pytest.mark.parametrize("overlap", [0, 64, 128])
def test_upscale_overlap_up_to_half_the_tile_is_accepted(tmp_path: Path, overlap: int) -> None:
    """Overlaps from 0 to exactly half the tile are valid."""
    config = load_config(_write(tmp_path, f"[engine]\nupscale_tile = 256\nupscale_tile_overlap = {overlap}\n"))
    assert config.engine.upscale_tile_overlap == overlap


@pytest.mark.parametrize("key", ["vae_batch", "upscale_tile_batch"])
def test_batch_sizes_must_be_at_least_1(tmp_path: Path, key: str) -> None:
    """engine.vae_batch and engine.upscale_tile_batch of 0 are refused; 1 is accepted."""
    message = _error(tmp_path, f"[engine]\n{key} = 0\n")
    assert f"engine.{key} = 0" in message
    assert "1 or more" in message
    config = load_config(_write(tmp_path, f"[engine]\n{key} = 1\n"))
    assert getattr(config.engine, key) == 1


def test_upscale_vae_tile_must_clear_twice_the_overlap(tmp_path: Path) -> None:
    """engine.upscale_vae_tile no larger than two overlaps, or not a multiple of 8, is refused."""
    message = _error(tmp_path, "[engine]\nupscale_vae_tile = 64\nupscale_tile_overlap = 32\n")
    assert "engine.upscale_vae_tile = 64" in message
    assert "twice engine.upscale_tile_overlap (32)" in message
    assert "engine.upscale_vae_tile = 100" in _error(tmp_path, "[engine]\nupscale_vae_tile = 100\n")
    assert load_config(_write(tmp_path, "[engine]\nupscale_vae_tile = 72\n")).engine.upscale_vae_tile == 72


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ('compile_mode = "fast"', "engine.speed.compile_mode = 'fast'; use one of default, reduce-overhead"),
        ("sizes = [[512, 500]]", "engine.speed.sizes has [512, 500]; give [width, height] pairs of multiples of 8"),
        ("sizes = [[512]]", "engine.speed.sizes has [512]"),
        ("sizes = [[2048, 2048]]", "multiples of 8 from 64 to 1024"),
        ("upscale_sizes = [[8, 8]]", "engine.speed.upscale_sizes has [8, 8]"),
        ("batches = [0, 2]", "engine.speed.batches = [0, 2]; UNet row counts are 1 or more"),
        ("upscale_batches = [-1]", "engine.speed.upscale_batches = [-1]"),
        ('compile = "sometimes"', "engine.speed.compile"),
        ("turbo = true", "unknown key `turbo` in [engine.speed]; allowed keys: tf32, channels_last"),
    ],
)
def test_speed_settings_are_checked(tmp_path: Path, text: str, expected: str) -> None:
    """Each bad [engine.speed] value is refused with a message naming the key and what is allowed."""
    assert expected in _error(tmp_path, f"[engine.speed]\n{text}\n")


def test_speed_settings_load(tmp_path: Path) -> None:
    """Booleans or "auto", buckets and modes load as written."""
    text = "[engine.speed]\ncompile = true\nchannels_last = false\nsizes = [[512, 768]]\nbatches = [1, 8]\n"
    speed = load_config(_write(tmp_path, text)).engine.speed
    assert speed == SpeedConfig(compile=True, channels_last=False, sizes=[[512, 768]], batches=[1, 8])
    assert speed.fuse_qkv == "auto"


def test_negative_preview_every_is_refused(tmp_path: Path) -> None:
    """engine.preview_every below 0 is an error; 0 (never) is fine."""
    assert "engine.preview_every = -1" in _error(tmp_path, "[engine]\npreview_every = -1\n")
    assert load_config(_write(tmp_path, "[engine]\npreview_every = 0\n")).engine.preview_every == 0


def test_max_width_must_be_a_multiple_of_8(tmp_path: Path) -> None:
    """limits.max_width that no request could reach exactly is refused."""
    assert "limits.max_width = 1020" in _error(tmp_path, "[limits]\nmax_width = 1020\n")


def test_a_models_table_adds_to_the_built_in_models(tmp_path: Path) -> None:
    """[models.mine] joins sd15 and x4 rather than replacing them."""
    text = '[models.mine]\nsource = "me/my-model"\ndescription = "Mine"\n\n[engine]\ndefault_model = "mine"\n'
    config = load_config(_write(tmp_path, text))
    assert set(config.models) == {"sd15", "x4", "mine"}
    assert config.models["sd15"] == default_models()["sd15"]
    assert config.models["x4"] == default_models()["x4"]
    assert config.models["mine"] == ModelSpec(source="me/my-model", description="Mine")
    assert config.models["mine"].kind is ModelKind.SD
    assert config.engine.default_model == "mine"


def test_a_models_table_with_a_built_in_name_replaces_it(tmp_path: Path) -> None:
    """[models.sd15] in the file overrides the built-in sd15 and keeps x4."""
    config = load_config(_write(tmp_path, '[models.sd15]\nsource = "/local/sd15"\n'))
    assert config.models["sd15"].source == "/local/sd15"
    assert config.models["x4"] == default_models()["x4"]


def test_model_without_source_is_an_error(tmp_path: Path) -> None:
    """source is the one required key of a model table."""
    message = _error(tmp_path, '[models.mine]\ndescription = "no source"\n')
    assert "`models.mine`" in message
    assert "missing required field `source`" in message


def test_partial_file_keeps_the_other_defaults(tmp_path: Path) -> None:
    """Keys left out of the file keep their defaults."""
    config = load_config(_write(tmp_path, '[engine]\ndevice = "cpu"\n\n[limits]\nmax_steps = 50\n'))
    defaults = load_config(None)
    assert config.engine == msgspec.structs.replace(defaults.engine, device="cpu")
    assert config.limits == msgspec.structs.replace(defaults.limits, max_steps=50)
    assert config.models == defaults.models


def test_the_12gb_profile_loads_and_bounds_memory() -> None:
    """deploy/easelbot-12gb.toml is a valid config that only lowers memory-bound settings."""
    path = example_path().parent / "deploy" / "easelbot-12gb.toml"
    config = load_config(path)
    default = load_config(None)
    assert config.queue.max_batch_images == 4 < default.queue.max_batch_images
    # Every batch the queue can form has a compiled bucket: 2 UNet rows per guided image.
    assert max(config.engine.speed.batches) == 2 * config.queue.max_batch_images
    assert config.engine.speed.compile_mode == "default"  # no CUDA graph pools
    assert config.engine.vae_batch == 1
    assert config.engine.upscale_tile_batch == 1
    assert config.engine.upscale_vae_tile * 4 <= 512  # decode tiles of at most 512 output pixels
    assert config.engine.preload == ["sd15", "x4"]


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("max_steps = -5", "limits.max_steps = -5; use 1 or more denoising steps"),
        ("max_steps = 0", "limits.max_steps = 0; use 1 or more"),
        ("max_guidance = -1.0", "limits.max_guidance = -1; use a number above 0"),
        ("max_guidance = 0.0", "limits.max_guidance = 0; use a number above 0"),
        ("max_guidance = nan", "limits.max_guidance = nan; use a number above 0"),
        ("max_prompt_chars = 0", "limits.max_prompt_chars = 0; use 1 or more characters"),
        ("min_side = 0", "limits.min_side = 0; use a multiple of 8"),
        (
            "min_side = 8",
            "limits.min_side = 8; use a multiple of 8 (the latents are an eighth of the image), at least 32",
        ),
        ("min_side = 60", "limits.min_side = 60; use a multiple of 8"),
        ("max_width = -8", "limits.max_width = -8; use a multiple of 8 of at least limits.min_side (64)"),
        (
            "min_side = 512\nmax_height = 256",
            "limits.max_height = 256; use a multiple of 8 of at least limits.min_side",
        ),
        ("max_upscale_side = 0", "limits.max_upscale_side = 0; use a multiple of 8, at least 16"),
        ("max_upscale_side = 1020", "limits.max_upscale_side = 1020; use a multiple of 8"),
        ("max_input_bytes = 0", "limits.max_input_bytes = 0; use 1 or more bytes"),
        ("max_input_pixels = 0", "limits.max_input_pixels = 0; use at least 4096 (limits.min_side squared)"),
    ],
)
def test_every_limit_is_checked_with_what_to_change(tmp_path: Path, text: str, expected: str) -> None:
    """A [limits] value no request could meet is refused naming the key and the allowed range, instead of
    passing `config check` and then refusing every request ("Steps must be between 1 and -5")."""
    assert expected in _error(tmp_path, f"[limits]\n{text}\n")


def test_the_smallest_sensible_limits_load(tmp_path: Path) -> None:
    """The lower bounds themselves are accepted: sides of 32 and 16, one step (with models that default to it),
    any guidance above 0 (likewise), one character, one byte."""
    text = (
        "[limits]\nmin_side = 32\nmax_width = 32\nmax_height = 32\nmax_upscale_side = 16\nmax_steps = 1\n"
        "max_guidance = 0.5\nmax_prompt_chars = 1\nmax_input_pixels = 1024\nmax_input_bytes = 1\n\n"
        "[engine.speed]\nsizes = [[32, 32]]\n"
        + "".join(
            f'\n[models.{name}]\nsource = "{name}"\nkind = "{kind}"\nsteps = 1\nguidance = 0.5\n'
            for name, kind in (("sd15", "sd"), ("x4", "upscaler"))
        )
    )
    limits = load_config(_write(tmp_path, text)).limits
    assert limits == Limits(
        min_side=32,
        max_width=32,
        max_height=32,
        max_upscale_side=16,
        max_steps=1,
        max_guidance=0.5,
        max_prompt_chars=1,
        max_input_pixels=1024,
        max_input_bytes=1,
    )


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (
            "[limits]\nmax_steps = 20\n",
            "limits.max_steps = 20 is below the 30 steps that txt2img requests to models.sd15 get when they do "
            "not say; raise limits.max_steps to at least 30 or set models.sd15.steps.",
        ),
        (
            "[limits]\nmax_guidance = 8.0\n",
            "limits.max_guidance = 8 is below the guidance of 9 that upscale requests to models.x4 get when they "
            "do not say; raise limits.max_guidance to at least 9 or set models.x4.guidance.",
        ),
        (
            '[engine]\ndefault_model = "tiny"\n\n[limits]\nmax_steps = 25\n\n'
            '[models.sd15]\nsource = "a/b"\nsteps = 25\n',
            "the 30 steps that txt2img requests to the built-in tiny model get when they do not say; "
            "raise limits.max_steps to at least 30.",
        ),
    ],
)
def test_default_steps_and_guidance_must_fit_the_limits(tmp_path: Path, text: str, expected: str) -> None:
    """Limits below the steps or guidance that requests get by default would refuse every request that leaves them
    out: an error says which model and both fixes (raise the limit, or give the model its own default)."""
    assert expected in _error(tmp_path, text)


def test_models_with_their_own_defaults_allow_lower_limits(tmp_path: Path) -> None:
    """With steps and guidance set on every model, max_steps and max_guidance may be below the global defaults."""
    text = (
        "[limits]\nmax_steps = 8\nmax_guidance = 2.0\n\n"
        '[models.sd15]\nsource = "a/b"\nsteps = 4\nguidance = 1.0\n\n'
        '[models.x4]\nsource = "c/d"\nkind = "upscaler"\nsteps = 8\nguidance = 2.0\n'
    )
    config = load_config(_write(tmp_path, text))
    assert (config.limits.max_steps, config.limits.max_guidance) == (8, 2.0)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("[queue]\njob_timeout_s = nan\n", "queue.job_timeout_s = nan; use a positive number of seconds"),
        ("[queue]\nengine_start_timeout_s = inf\n", "queue.engine_start_timeout_s = inf; use a positive number"),
        ("[queue]\nshutdown_grace_s = nan\n", "queue.shutdown_grace_s = nan; use 0 or more"),
        ("[queue]\nretention_days = -inf\n", "queue.retention_days = -inf; use 0 or more"),
        ('[queue]\nstore = ""\n', "queue.store is empty; name a file or folder"),
        ('[queue]\noutputs = " "\n', "queue.outputs is empty"),
        ("[queue]\nmax_queued_per_user = 0\n", "queue.max_queued_per_user = 0; use 1 or more"),
        ("[queue]\nmax_wait_ms = 60000\n", "queue.max_wait_ms = 60000; use 0 to 10000"),
        ("[web]\nport = 0\n", "web.port = 0; use a TCP port from 1 to 65535"),
        ('[web]\nhost = ""\n', 'web.host is empty; use an address such as "127.0.0.1"'),
        ("[web]\nhistory = -1\n", "web.history = -1; use 0 to 200"),
        ("[web]\nhistory = 500\n", "web.history = 500; use 0 to 200"),
        ('[slack]\nhost = ""\n', "slack.host is empty"),
        ("[discord]\nedit_interval_s = nan\n", "discord.edit_interval_s = nan; use 0 or more seconds"),
        ("[redis]\nheartbeat_s = nan\n", "redis.heartbeat_s = nan; use a positive number of seconds"),
    ],
)
def test_other_tables_refuse_values_that_make_no_sense(tmp_path: Path, text: str, expected: str) -> None:
    """Not-a-number and infinite durations, empty paths and hosts, and out-of-range sizes name the key and the fix."""
    assert expected in _error(tmp_path, text)
