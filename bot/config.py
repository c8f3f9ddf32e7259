"""Loading the one TOML config file into typed objects, once, with errors that name file, key and fix.

Unknown keys are errors, not ignored. Secrets (tokens, API keys, passwords) never live in the file:
they come from the environment. Every key is documented with its default in config.example.toml.
"""

from __future__ import annotations

import math
import re
import tomllib
from pathlib import Path
from typing import Any

import msgspec
import msgspec.inspect

from engine.config import TINY, EngineConfig, ModelKind, ModelSpec, SafetyConfig, Settings, SpeedConfig, default_models
from engine.errors import ConfigError
from engine.protocol import (
    DEFAULT_GUIDANCE,
    DEFAULT_STEPS,
    LCM_MAX_STEPS,
    MIN_UPSCALE_SIDE,
    SCHEDULERS,
    Limits,
    Task,
)
from engine.redis_protocol import RedisConfig

MAX_WAIT_MS = 10_000
"""The longest `[queue] max_wait_ms` allowed: ten seconds."""


class QueueConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """`[queue]`: the shared job queue, its store and its limits."""

    store: str = "easelbot.db"
    """SQLite file holding every job (relative paths are relative to the working directory)."""
    outputs: str = "outputs"
    """Folder of result images, named by the SHA-256 of their bytes."""
    max_batch_images: int = 8
    """Most images the engine runs in one batch."""
    max_wait_ms: int = 30
    """Longest a job that could share a batch waits for companions before it runs anyway (less once it is full)."""
    max_queued_per_user: int = 5
    """Most unfinished jobs one user may have."""
    max_queue_length: int = 200
    """Most unfinished jobs in all."""
    max_images_per_user_per_hour: int = 100
    """Most images one user may ask for in any hour (0: no limit)."""
    job_timeout_s: float = 600.0
    """A job still running after this long is stopped and failed."""
    engine_start_timeout_s: float = 900.0
    """How long the engine may take to start and load its models."""
    restart_backoff_s: float = 1.0
    """Wait before restarting a crashed engine; doubles on each crash in a row, up to 60 s."""
    shutdown_grace_s: float = 30.0
    """On SIGTERM, how long the running batch may take to finish; unfinished jobs run after restart."""
    retention_days: float = 30.0
    """Result images older than this are deleted (0: keep forever)."""
    retention_max_gb: float = 20.0
    """The outputs folder is trimmed, oldest first, to stay under this size (0: no limit)."""
    engine_socket: str = ""
    """Empty: run the engine as a child process. A path: connect to `easelbot engine --socket PATH`."""
    priority_users: dict[str, int] = {}
    """Priority by user, as `"platform:user_id" = N`; higher runs first (default 0)."""
    priority_roles: dict[str, int] = {}
    """Priority by role name, as `"Patron" = N`; a user gets the highest of their roles."""

    def kill_grace(self) -> float:
        """How long past `job_timeout_s` a job may take to stop before its engine is given up on (1-30 s)."""
        return max(1.0, min(30.0, self.job_timeout_s / 2))

    def restart_delay(self, failures: int) -> float:
        """Wait before the next engine start (or Redis connection) after `failures` in a row: doubling, up to 60 s."""
        return min(60.0, self.restart_backoff_s * 2.0 ** (failures - 1))


class WebConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """`[web]`: the web playground and HTTP API (also serves /healthz, /readyz and /metrics)."""

    enabled: bool = True
    """Serve the playground and API."""
    host: str = "127.0.0.1"
    """Address to listen on. Anything but loopback requires API keys in EASELBOT_API_KEYS."""
    port: int = 8080
    """TCP port."""
    title: str = "easelbot"
    """Name shown on the playground page."""
    history: int = 50
    """Jobs the playground shows when it opens (and `GET /api/v1/jobs` returns without `limit`), 0 to 200."""


class LogConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """`[log]`: how `easelbot run` logs."""

    level: str = "info"
    """`debug`, `info`, `warning` or `error`."""
    format: str = "text"
    """`text` for people, `json` (one object a line, with job ids) for log pipelines."""


class ChatConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """`[chat]`: rules shared by every chat platform (and the web playground for the blocklist)."""

    blocklist: list[str] = []
    """Words or phrases refused in prompts and negative prompts (whole words, any case)."""
    nsfw: str = "spoiler"
    """Images the safety checker flags: `spoiler` (as spoilers in age-restricted channels, withheld
    elsewhere), `withhold` (never posted) or `show` (posted as spoilers everywhere)."""


class DiscordConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """`[discord]`: the Discord adapter. The bot token comes only from the DISCORD_TOKEN environment variable."""

    enabled: bool = False
    """Connect to Discord (needs DISCORD_TOKEN)."""
    dev_guild: str = ""
    """A guild id whose commands sync instantly (global commands can take up to an hour); empty: global."""
    api_base: str = ""
    """REST base URL of a Discord REST proxy, e.g. `http://proxy:8080/api/v10`; empty: Discord itself."""
    gateway_url: str = ""
    """Gateway websocket URL of a gateway proxy, e.g. `ws://gateway:7878`; empty: Discord's gateway."""
    guilds: list[str] = []
    """Guild ids the bot answers in; empty: every guild it is in."""
    channels: list[str] = []
    """Channel ids the bot answers in; empty: every channel."""
    allow_dms: bool = True
    """Answer commands in direct messages."""
    moderator_roles: list[str] = []
    """Role names that may delete anyone's results (members with Manage Messages always can)."""
    edit_interval_s: float = 1.0
    """Least time between two progress edits of one response."""


class SlackConfig(msgspec.Struct, frozen=True, kw_only=True, forbid_unknown_fields=True):
    """`[slack]`: the Slack adapter. Tokens come only from SLACK_BOT_TOKEN, SLACK_APP_TOKEN and SLACK_SIGNING_SECRET."""

    enabled: bool = False
    """Connect to Slack (needs SLACK_BOT_TOKEN, plus SLACK_APP_TOKEN or SLACK_SIGNING_SECRET)."""
    mode: str = "socket"
    """`socket` (Socket Mode: no public URL; SLACK_APP_TOKEN) or `http` (Events API; SLACK_SIGNING_SECRET)."""
    host: str = "0.0.0.0"
    """HTTP mode: address to listen on."""
    port: int = 3000
    """HTTP mode: TCP port."""
    path: str = "/slack/events"
    """HTTP mode: the request URL path set in the Slack app."""
    api_base: str = ""
    """Web API base URL, e.g. `https://slack-gov.com/api/` for GovSlack; empty: `https://slack.com/api/`."""
    channels: list[str] = []
    """Channel ids the bot answers in; empty: every channel it is in."""
    nsfw_channels: list[str] = []
    """Channel ids treated as age-restricted for `[chat] nsfw`."""
    update_interval_s: float = 3.0
    """Least time between two progress updates of one message."""


class Config(Settings, frozen=True, kw_only=True):
    """The whole configuration: the engine's settings plus the bot's own tables."""

    queue: QueueConfig = msgspec.field(default_factory=QueueConfig)
    web: WebConfig = msgspec.field(default_factory=WebConfig)
    log: LogConfig = msgspec.field(default_factory=LogConfig)
    chat: ChatConfig = msgspec.field(default_factory=ChatConfig)
    discord: DiscordConfig = msgspec.field(default_factory=DiscordConfig)
    slack: SlackConfig = msgspec.field(default_factory=SlackConfig)
    redis: RedisConfig = msgspec.field(default_factory=RedisConfig)

    def engine_settings(self) -> Settings:
        """The part an engine process needs."""
        return Settings(engine=self.engine, limits=self.limits, models=self.models)


_TABLES: dict[str, type[msgspec.Struct]] = {
    "": Settings,
    "engine": EngineConfig,
    "engine.safety": SafetyConfig,
    "engine.speed": SpeedConfig,
    "limits": Limits,
    "models[...]": ModelSpec,
    "queue": QueueConfig,
    "web": WebConfig,
    "log": LogConfig,
    "chat": ChatConfig,
    "discord": DiscordConfig,
    "slack": SlackConfig,
    "redis": RedisConfig,
}


def load_config(path: Path | None) -> Config:
    """Read and check the config file; no file means every default."""
    if path is None:
        return _checked(Config(), "defaults")
    try:
        data = tomllib.loads(path.read_text(encoding="utf-8"))
    except FileNotFoundError:
        raise ConfigError(f"{path}: no such config file. Copy config.example.toml to start one.") from None
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read the config file: {exc.strerror or exc}.") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: not a UTF-8 text file; the config is a TOML text file.") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: not valid TOML: {exc}.") from None
    return parse_config(data, str(path))


def parse_config(data: dict[str, Any], source: str) -> Config:
    """Convert parsed TOML into a Config, explaining the first problem in terms of the file."""
    unknown = set(data) - set(Config.__struct_fields__)
    if unknown:
        allowed = ", ".join(f"[{name}]" for name in Config.__struct_fields__)
        raise ConfigError(f"{source}: unknown table or key `{sorted(unknown)[0]}`; allowed: {allowed}.")
    models = data.get("models", {})
    for name, table in models.items() if isinstance(models, dict) else ():
        try:  # one table at a time, so an error names the model
            msgspec.convert(table, ModelSpec)
        except msgspec.ValidationError as exc:
            raise ConfigError(_explain(source, str(exc), within=f"models[{name}]")) from None
    try:
        config = msgspec.convert(data, Config)
    except msgspec.ValidationError as exc:
        raise ConfigError(_explain(source, str(exc))) from None
    if "models" in data:
        config = msgspec.structs.replace(config, models={**default_models(), **config.models})
    return _checked(config, source)


def _explain(source: str, message: str, within: str = "") -> str:
    """Reword a msgspec error in terms of the file: `[engine] preview_every`, `models.mine.source`."""
    match = re.match(r"(?P<what>.*?)(?: - at `\$(?P<path>[^`]*)`)?$", message)
    if not match:
        return f"{source}: {message}"
    path = ".".join(filter(None, [within, (match["path"] or "").lstrip(".")]))
    what = match["what"]
    unknown = re.match(r"Object contains unknown field `(?P<key>[^`]+)`", what)
    if unknown:
        fields = _TABLES.get(re.sub(r"models\[[^]]*\]", "models[...]", path), Settings).__struct_fields__
        shown = re.sub(r"models\[([^]]*)\]", r"models.\1", path) or "top level"
        return f"{source}: unknown key `{unknown['key']}` in [{shown}]; allowed keys: {', '.join(fields)}."
    key = re.sub(r"models\[([^]]*)\]", r"models.\1", path)
    choices = _enum_values(path) if what.startswith("Invalid enum value") else None
    if choices:
        return f"{source}: `{key}`: {what[0].lower()}{what[1:]}; use one of {', '.join(choices)}."
    return f"{source}: `{key}`: {what[0].lower()}{what[1:]}."


def _enum_values(path: str) -> list[str] | None:
    """The allowed values of the enum setting at a msgspec error path such as `models[mine].kind`."""
    info: Any = msgspec.inspect.type_info(Config)
    for part in re.sub(r"\[[^]]*\]", ".[]", path).split("."):
        if isinstance(info, msgspec.inspect.Metadata):
            info = info.type
        if part == "[]" and isinstance(info, msgspec.inspect.DictType | msgspec.inspect.ListType):
            info = info.value_type if isinstance(info, msgspec.inspect.DictType) else info.item_type
        elif part and isinstance(info, msgspec.inspect.StructType):
            info = next((field.type for field in info.fields if field.encode_name == part), None)
        elif part:
            return None
    if isinstance(info, msgspec.inspect.EnumType):
        return [str(member.value) for member in info.cls]
    if isinstance(info, msgspec.inspect.UnionType):  # `true`, `false` or "auto" (engine.speed switches)
        values: list[str] = []
        for member in info.types:
            if isinstance(member, msgspec.inspect.BoolType):
                values += ["true", "false"]
            elif isinstance(member, msgspec.inspect.LiteralType):
                values += [f'"{value}"' if isinstance(value, str) else str(value) for value in member.values]
        return values or None
    return None


COMPILE_MODES = ("default", "reduce-overhead", "max-autotune", "max-autotune-no-cudagraphs")


def _check_speed(speed: SpeedConfig, limits: Limits, source: str) -> None:
    """The compile buckets must be sizes a request can have; the mode one torch.compile knows."""
    if speed.compile_mode not in COMPILE_MODES:
        raise ConfigError(
            f"{source}: engine.speed.compile_mode = {speed.compile_mode!r}; use one of {', '.join(COMPILE_MODES)}."
        )
    for key, sizes, low, high in (
        ("engine.speed.sizes", speed.sizes, limits.min_side, max(limits.max_width, limits.max_height)),
        ("engine.speed.upscale_sizes", speed.upscale_sizes, 16, limits.max_upscale_side),
    ):
        for size in sizes:
            if len(size) != 2 or any(side % 8 or not low <= side <= high for side in size):
                raise ConfigError(
                    f"{source}: {key} has {size}; give [width, height] pairs of multiples of 8 from {low} to {high}."
                )
    for width, height in speed.sizes:
        if width > limits.max_width or height > limits.max_height:
            raise ConfigError(
                f"{source}: engine.speed.sizes has {[width, height]}, beyond [limits] max_width x max_height = "
                f"{limits.max_width}x{limits.max_height}: no request can have that size, so compiling it would only "
                "slow the start. Remove it or raise the limits."
            )
    for key, rows in (("engine.speed.batches", speed.batches), ("engine.speed.upscale_batches", speed.upscale_batches)):
        if any(n < 1 for n in rows):
            raise ConfigError(f"{source}: {key} = {rows}; UNet row counts are 1 or more (a guided image takes 2).")


def _checked(config: Config, source: str) -> Config:
    """Checks that span keys, which a type alone cannot express."""
    engine, limits = config.engine, config.limits
    names = {*config.models, TINY}
    for key, name, kind in (
        ("engine.default_model", engine.default_model, ModelKind.SD),
        ("engine.default_upscaler", engine.default_upscaler, ModelKind.UPSCALER),
    ):
        spec = config.models.get(name)
        if name != TINY and (spec is None or spec.kind is not kind):
            choices = [*sorted(n for n, s in config.models.items() if s.kind is kind), TINY]
            raise ConfigError(f"{source}: {key} = {name!r} is not a configured {kind} model; use one of {choices}.")
    for name in engine.preload:
        if name not in names:
            raise ConfigError(f"{source}: engine.preload names unknown model {name!r}; configured: {sorted(names)}.")
    if engine.upscale_tile % 8 or engine.upscale_tile < 32:
        raise ConfigError(f"{source}: engine.upscale_tile = {engine.upscale_tile}; use a multiple of 8, at least 32.")
    if engine.upscale_tile_overlap % 8 or not 0 <= engine.upscale_tile_overlap <= engine.upscale_tile // 2:
        raise ConfigError(
            f"{source}: engine.upscale_tile_overlap = {engine.upscale_tile_overlap}; "
            f"use a multiple of 8 from 0 to {engine.upscale_tile // 2} (half the tile)."
        )
    if engine.upscale_vae_tile % 8 or engine.upscale_vae_tile < 2 * engine.upscale_tile_overlap + 8:
        raise ConfigError(
            f"{source}: engine.upscale_vae_tile = {engine.upscale_vae_tile}; use a multiple of 8 larger than "
            f"twice engine.upscale_tile_overlap ({engine.upscale_tile_overlap})."
        )
    _check_limits(limits, source)
    _check_default_options(config, source)
    _check_speed(engine.speed, limits, source)
    if not re.fullmatch(r"auto|cpu|mps|(cuda|xpu)(:\d+)?", engine.device):
        raise ConfigError(
            f"{source}: engine.device = {engine.device!r}; use auto, cpu, cuda or cuda:N (N: the GPU's index)."
        )
    if engine.dtype not in ("auto", "float16", "bfloat16", "float32"):
        raise ConfigError(f"{source}: engine.dtype = {engine.dtype!r}; use auto, float16, bfloat16 or float32.")
    for key, value in (
        ("engine.vae_batch", engine.vae_batch),
        ("engine.upscale_tile_batch", engine.upscale_tile_batch),
    ):
        if value < 1:
            raise ConfigError(f"{source}: {key} = {value}; use 1 or more.")
    if engine.preview_every < 0:
        raise ConfigError(f"{source}: engine.preview_every = {engine.preview_every}; use 0 (off) or more.")
    queue = config.queue
    for key, path in (("queue.store", queue.store), ("queue.outputs", queue.outputs)):
        if not path.strip():
            raise ConfigError(f"{source}: {key} is empty; name a file or folder (relative to the working directory).")
    for key, number in (
        ("queue.max_batch_images", queue.max_batch_images),
        ("queue.max_queued_per_user", queue.max_queued_per_user),
        ("queue.max_queue_length", queue.max_queue_length),
    ):
        if number < 1:
            raise ConfigError(f"{source}: {key} = {number}; use 1 or more.")
    for key, seconds in (
        ("queue.job_timeout_s", queue.job_timeout_s),
        ("queue.engine_start_timeout_s", queue.engine_start_timeout_s),
        ("queue.restart_backoff_s", queue.restart_backoff_s),
    ):
        if not (math.isfinite(seconds) and seconds > 0):
            raise ConfigError(f"{source}: {key} = {seconds:g}; use a positive number of seconds.")
    for key, amount in (
        ("queue.max_wait_ms", queue.max_wait_ms),
        ("queue.max_images_per_user_per_hour", queue.max_images_per_user_per_hour),
        ("queue.shutdown_grace_s", queue.shutdown_grace_s),
        ("queue.retention_days", queue.retention_days),
        ("queue.retention_max_gb", queue.retention_max_gb),
    ):
        if not (math.isfinite(amount) and amount >= 0):
            raise ConfigError(f"{source}: {key} = {amount:g}; use 0 or more.")
    if queue.max_wait_ms > MAX_WAIT_MS:
        raise ConfigError(
            f"{source}: queue.max_wait_ms = {queue.max_wait_ms}; use 0 to {MAX_WAIT_MS} (a lone job waits this long "
            "for companions while the GPU is free, and its timeout is not watched meanwhile)."
        )
    if config.log.level not in ("debug", "info", "warning", "error"):
        raise ConfigError(f"{source}: log.level = {config.log.level!r}; use debug, info, warning or error.")
    if config.log.format not in ("text", "json"):
        raise ConfigError(f"{source}: log.format = {config.log.format!r}; use text or json.")
    if not 1 <= config.web.port <= 65535:
        raise ConfigError(f"{source}: web.port = {config.web.port}; use a TCP port from 1 to 65535.")
    if not 0 <= config.web.history <= WEB_LIST_MAX:
        raise ConfigError(
            f"{source}: web.history = {config.web.history}; use 0 to {WEB_LIST_MAX} (the most one API listing returns)."
        )
    for key, host in (("web.host", config.web.host), ("slack.host", config.slack.host)):
        if not host.strip():
            raise ConfigError(f'{source}: {key} is empty; use an address such as "127.0.0.1" (this machine only).')
    if config.chat.nsfw not in ("spoiler", "withhold", "show"):
        raise ConfigError(f"{source}: chat.nsfw = {config.chat.nsfw!r}; use spoiler, withhold or show.")
    if config.slack.mode not in ("socket", "http"):
        raise ConfigError(f"{source}: slack.mode = {config.slack.mode!r}; use socket or http.")
    if not 1 <= config.slack.port <= 65535:
        raise ConfigError(f"{source}: slack.port = {config.slack.port}; use a TCP port from 1 to 65535.")
    if not config.slack.path.startswith("/"):
        raise ConfigError(f"{source}: slack.path = {config.slack.path!r}; use a path starting with /.")
    for key, interval in (
        ("discord.edit_interval_s", config.discord.edit_interval_s),
        ("slack.update_interval_s", config.slack.update_interval_s),
    ):
        if not (math.isfinite(interval) and interval >= 0):
            raise ConfigError(f"{source}: {key} = {interval:g}; use 0 or more seconds.")
    for key, ids in (
        ("discord.guilds", config.discord.guilds),
        ("discord.channels", config.discord.channels),
        ("discord.dev_guild", [config.discord.dev_guild] if config.discord.dev_guild else []),
    ):
        for snowflake in ids:
            if not snowflake.isdigit():
                raise ConfigError(
                    f'{source}: {key} has {snowflake!r}; Discord ids are numbers, e.g. "123456789012345678".'
                )
    for key, url, schemes in (
        ("discord.api_base", config.discord.api_base, ("http://", "https://")),
        ("discord.gateway_url", config.discord.gateway_url, ("ws://", "wss://")),
        ("slack.api_base", config.slack.api_base, ("http://", "https://")),
    ):
        if url and not url.startswith(schemes):
            raise ConfigError(f"{source}: {key} = {url!r}; use a URL starting with {' or '.join(schemes)}.")
    _check_redis(config.redis, source)
    for name, spec in config.models.items():
        _check_model(name, spec, config.limits, source)
    return config


MIN_SIDE_FLOOR = 32
"""Least `limits.min_side`: image sides are multiples of 8 (the latents are an eighth of the image), and below
32 pixels the UNet's three downsamplings work on a latent of a pixel or two."""
WEB_LIST_MAX = 200
"""Most jobs one `GET /api/v1/jobs` returns (bot/adapters/web.py), so the most `web.history` may ask for."""


def _check_limits(limits: Limits, source: str) -> None:
    """Every [limits] key: a range some request can meet, in the multiples of 8 that image sides come in."""
    if limits.min_side % 8 or limits.min_side < MIN_SIDE_FLOOR:
        raise ConfigError(
            f"{source}: limits.min_side = {limits.min_side}; use a multiple of 8 (the latents are an eighth of "
            f"the image), at least {MIN_SIDE_FLOOR}."
        )
    for key, value in (("limits.max_width", limits.max_width), ("limits.max_height", limits.max_height)):
        if value % 8 or value < limits.min_side:
            raise ConfigError(
                f"{source}: {key} = {value}; use a multiple of 8 of at least limits.min_side ({limits.min_side})."
            )
    if limits.max_upscale_side % 8 or limits.max_upscale_side < MIN_UPSCALE_SIDE:
        raise ConfigError(
            f"{source}: limits.max_upscale_side = {limits.max_upscale_side}; use a multiple of 8, at least "
            f"{MIN_UPSCALE_SIDE} (the smallest image the upscaler takes)."
        )
    for key, number, what in (
        ("limits.max_steps", limits.max_steps, "denoising steps"),
        ("limits.max_prompt_chars", limits.max_prompt_chars, "characters"),
        ("limits.max_input_bytes", limits.max_input_bytes, "bytes"),
    ):
        if number < 1:
            raise ConfigError(f"{source}: {key} = {number}; use 1 or more {what}.")
    if not (math.isfinite(limits.max_guidance) and limits.max_guidance > 0):
        raise ConfigError(
            f"{source}: limits.max_guidance = {limits.max_guidance:g}; use a number above 0 "
            "(requests ask for 7.5 unless they or their model say otherwise)."
        )
    least_pixels = limits.min_side * limits.min_side
    if limits.max_input_pixels < least_pixels:
        raise ConfigError(
            f"{source}: limits.max_input_pixels = {limits.max_input_pixels}; use at least {least_pixels} "
            f"(limits.min_side squared), or no image to edit could be opened."
        )


def _check_default_options(config: Config, source: str) -> None:
    """The steps and guidance a request gets when it does not say must be within the limits, or every such request
    to that model is refused. A model's own `steps`/`guidance` are checked with its table (`_check_model`)."""
    limits = config.limits
    models: list[tuple[str, ModelSpec | None, tuple[Task, ...]]] = [
        (f"models.{name}", spec, spec.tasks()) for name, spec in config.models.items()
    ]
    tiny = (Task.TXT2IMG,) * (config.engine.default_model == TINY) + (Task.UPSCALE,) * (
        config.engine.default_upscaler == TINY
    )
    if tiny:
        models.append(("the built-in tiny model", None, tiny))
    for name, spec, tasks in models:
        fix = f" or set {name}.{{}}" if spec is not None else ""
        for task in tasks:
            steps = DEFAULT_STEPS[task]
            if (spec is None or spec.steps is None) and steps > limits.max_steps:
                raise ConfigError(
                    f"{source}: limits.max_steps = {limits.max_steps} is below the {steps} steps that {task} requests "
                    f"to {name} get when they do not say; raise limits.max_steps to at least {steps}"
                    f"{fix.format('steps')}."
                )
            guidance = DEFAULT_GUIDANCE[task]
            if (spec is None or spec.guidance is None) and guidance > limits.max_guidance:
                raise ConfigError(
                    f"{source}: limits.max_guidance = {limits.max_guidance:g} is below the guidance of {guidance:g} "
                    f"that {task} requests to {name} get when they do not say; raise limits.max_guidance to at "
                    f"least {guidance:g}{fix.format('guidance')}."
                )


_PICKLES = (".ckpt", ".bin", ".pt", ".pth")


def _check_model(name: str, spec: ModelSpec, limits: Limits, source: str) -> None:
    """One [models.NAME] table: safe weights, a usable LoRA, defaults within the limits."""
    key = f"models.{name}"
    for field, path in (("source", spec.source), ("lora", spec.lora), ("lora_file", spec.lora_file)):
        if path.endswith(_PICKLES):
            raise ConfigError(
                f"{source}: {key}.{field} = {path!r} is a pickle checkpoint, which can run "
                "arbitrary code; use a .safetensors file or a diffusers folder."
            )
    if not spec.source.strip():
        raise ConfigError(
            f"{source}: {key}.source is empty; name a Hugging Face repo, a folder or a .safetensors file."
        )
    if spec.lora_file and not spec.lora:
        raise ConfigError(f"{source}: {key}.lora_file is set without {key}.lora; name the repo or folder it is in.")
    if spec.lora_file and not spec.lora_file.endswith(".safetensors"):
        raise ConfigError(f"{source}: {key}.lora_file = {spec.lora_file!r}; name a .safetensors file.")
    if spec.lora and spec.kind is not ModelKind.SD:
        raise ConfigError(f'{source}: {key}.lora is for Stable Diffusion models (kind = "sd"), not upscalers.')
    if spec.lora and spec.inpaint_source:
        raise ConfigError(
            f"{source}: {key} has both lora and inpaint_source; a LoRA is fused into the base UNet only. "
            "Remove inpaint_source (inpainting then uses the base model with the LoRA) or the LoRA."
        )
    if not (math.isfinite(spec.lora_scale) and 0 < spec.lora_scale <= 4):
        raise ConfigError(f"{source}: {key}.lora_scale = {spec.lora_scale:g}; use a number above 0 and at most 4.")
    if spec.scheduler and spec.scheduler not in SCHEDULERS:
        raise ConfigError(f"{source}: {key}.scheduler = {spec.scheduler!r}; use one of {', '.join(SCHEDULERS)}.")
    most = min(limits.max_steps, LCM_MAX_STEPS) if spec.scheduler == "lcm" else limits.max_steps
    if spec.steps is not None and not 1 <= spec.steps <= most:
        raise ConfigError(f"{source}: {key}.steps = {spec.steps}; use 1 to {most}.")
    if spec.guidance is not None and not (math.isfinite(spec.guidance) and 0 <= spec.guidance <= limits.max_guidance):
        raise ConfigError(f"{source}: {key}.guidance = {spec.guidance:g}; use 0 to {limits.max_guidance:g}.")


def _check_redis(redis: RedisConfig, source: str) -> None:
    """The [redis] table (engine workers through Redis Streams)."""
    if not re.fullmatch(r"[A-Za-z0-9_.{}-]+", redis.prefix):
        raise ConfigError(
            f"{source}: redis.prefix = {redis.prefix!r}; use letters, digits, `_`, `-`, `.`, `{{` or `}}`."
        )
    for key, seconds in (
        ("redis.claim_idle_s", redis.claim_idle_s),
        ("redis.heartbeat_s", redis.heartbeat_s),
        ("redis.worker_timeout_s", redis.worker_timeout_s),
        ("redis.result_ttl_s", redis.result_ttl_s),
        ("redis.no_worker_timeout_s", redis.no_worker_timeout_s),
    ):
        if not (math.isfinite(seconds) and seconds > 0):
            raise ConfigError(f"{source}: {key} = {seconds:g}; use a positive number of seconds.")
    if redis.worker_timeout_s <= redis.heartbeat_s:
        raise ConfigError(
            f"{source}: redis.worker_timeout_s = {redis.worker_timeout_s:g} must be longer than redis.heartbeat_s = "
            f"{redis.heartbeat_s:g} (a few heartbeats, e.g. 5x), or live workers would look gone."
        )
    if redis.claim_idle_s <= redis.heartbeat_s:
        raise ConfigError(
            f"{source}: redis.claim_idle_s = {redis.claim_idle_s:g} must be longer than redis.heartbeat_s = "
            f"{redis.heartbeat_s:g}, or batches of live workers would be claimed by others."
        )
    if redis.max_deliveries < 1:
        raise ConfigError(f"{source}: redis.max_deliveries = {redis.max_deliveries}; use 1 or more.")
    if redis.results not in ("redis", "shared"):
        raise ConfigError(f"{source}: redis.results = {redis.results!r}; use redis or shared.")
    if redis.results == "shared" and not redis.shared_dir:
        raise ConfigError(
            f'{source}: redis.results = "shared" needs redis.shared_dir, a folder the bot and every worker mount.'
        )


def example_path() -> Path:
    """The documented example config shipped next to the package."""
    return Path(__file__).resolve().parent.parent / "config.example.toml"
