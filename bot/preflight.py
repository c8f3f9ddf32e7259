"""What `easelbot run` needs beyond a valid config file: secrets in the environment and model weights on disk.

`easelbot config check` reports it after validating the file, and `easelbot models list` shows where each
model's weights stand, so an operator learns about a missing token or an undownloaded model before starting
the bot rather than from its first failed job. Neither looks at the network or imports torch: a model counts
as downloaded when its index and UNet weights are in the Hugging Face cache (or its folder or file exists).
Secrets are only tested for presence, never printed.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

from bot.adapters.web_access import API_KEYS_ENV, api_keys, is_loopback
from bot.config import Config
from engine.config import ModelSpec
from engine.errors import ConfigError

_INDEX = "model_index.json"
_UNET = "unet/diffusion_pytorch_model.safetensors"
_WEIGHTS = "the weights"


@dataclass(frozen=True)
class Finding:
    """One thing `easelbot run` would lack (`problem`) or that is worth knowing before it starts."""

    subject: str
    text: str
    problem: bool = True


@dataclass(frozen=True)
class WeightsStatus:
    """Where one model's weights stand on this machine."""

    label: str
    """A word or two for a table: `downloaded`, `local`, `to fetch` (the engine downloads it on first use), `not
    downloaded` (and engine.offline forbids fetching it) or `missing` (a path or setting that is wrong)."""
    text: str = ""
    """What is missing, where something is."""
    fix: str = ""
    """What to do about it."""

    @property
    def ready(self) -> bool:
        return self.label in ("downloaded", "local")

    def __str__(self) -> str:
        return "; ".join(part for part in (self.text or self.label, self.fix) if part)


def environment(config: Config) -> list[Finding]:
    """The secrets the enabled adapters, the web API and Redis need from the environment, and the models the
    engine loads on this machine (not in Redis mode: workers load them)."""
    findings: list[Finding] = []
    if config.discord.enabled:
        findings += _secrets("discord", [("DISCORD_TOKEN", "[discord] enabled = true")])
    if config.slack.enabled:
        second = (
            ("SLACK_APP_TOKEN", "[slack] mode = socket")
            if config.slack.mode == "socket"
            else ("SLACK_SIGNING_SECRET", "[slack] mode = http")
        )
        findings += _secrets("slack", [("SLACK_BOT_TOKEN", "[slack] enabled = true"), second])
    if config.web.enabled and not is_loopback(config.web.host) and not api_keys():
        findings.append(
            Finding(
                "web",
                f"web.host = {config.web.host!r} is reachable from other machines, so `easelbot run` refuses to "
                f'start without API keys: set {API_KEYS_ENV} (comma-separated secrets) or use host = "127.0.0.1".',
            )
        )
    if config.redis.enabled:
        findings += _secrets("redis", [("EASELBOT_REDIS_URL", "[redis] enabled = true")])
        if os.environ.get("EASELBOT_REDIS_URL", "").strip():
            from engine.redis_protocol import redis_url

            try:
                redis_url()
            except ConfigError as exc:  # `run` refuses it the same way; the message shows the URL masked
                findings.append(Finding("redis", str(exc)))
        return findings
    for name, spec in sorted(config.models.items()):
        status = weights(config, spec, name)
        if not status.ready:
            findings.append(Finding(f"model {name}", str(status), problem=_blocks(config, status)))
    if config.engine.safety.enabled:
        source = config.engine.safety.source
        safety = _repo_status(
            config, source, "config.json", "the safety checker", download=source, setting="engine.safety.source"
        )
        if not safety.ready:
            findings.append(Finding("safety checker", str(safety), problem=_blocks(config, safety)))
    return findings


def _blocks(config: Config, status: WeightsStatus) -> bool:
    """Weights that are not here are a problem where the engine cannot fetch them: offline, or a wrong path."""
    return config.engine.offline or status.label == "missing"


def weights(config: Config, spec: ModelSpec, name: str) -> WeightsStatus:
    """Whether a configured model's weights (and its inpainting checkpoint, architecture config and LoRA, where
    set) are on this machine, and what to do if not."""
    setting = f"models.{name}."
    if spec.source.endswith(".safetensors"):
        if not Path(spec.source).is_file():
            return WeightsStatus("missing", f"the checkpoint file {spec.source} does not exist", f"fix {setting}source")
        if config.engine.offline and not spec.config:
            return WeightsStatus(
                "missing",
                "a single-file checkpoint needs its architecture config with engine.offline set",
                f"set models.{name}.config to a diffusers folder or repo of the same architecture",
            )
        parts = [(spec.config, _INDEX, "its architecture config", "config")] if spec.config else []
    else:
        parts = [(spec.source, _UNET, _WEIGHTS, "source")]
    if spec.inpaint_source:
        parts.append((spec.inpaint_source, _UNET, "the inpainting checkpoint", "inpaint_source"))
    if spec.lora.endswith(".safetensors"):
        if not Path(spec.lora).is_file():
            return WeightsStatus("missing", f"the LoRA file {spec.lora} does not exist", f"fix {setting}lora")
    elif spec.lora:
        parts.append((spec.lora, spec.lora_file, "the LoRA", "lora"))
    labels = set()
    for source, filename, what, key in parts:
        part = _repo_status(config, source, filename, what, download=name, setting=setting + key)
        if not part.ready:
            return part
        labels.add(part.label)
    return WeightsStatus("downloaded" if "downloaded" in labels else "local")


def _repo_status(
    config: Config, source: str, filename: str, what: str, *, download: str, setting: str
) -> WeightsStatus:
    """A repo id in the Hugging Face cache, or a local folder; `filename` is one file it must hold; `download` is
    what to name to `easelbot models download`, `setting` the config key that names `source`."""
    if Path(source).exists():
        if filename and not (Path(source) / filename).is_file():
            return WeightsStatus("missing", f"{what}: the folder {source} has no {filename}")
        return WeightsStatus("local")
    try:
        cached = _cached(config, source, filename)
    except ValueError:  # huggingface_hub's HFValidationError: not a repo id, so a folder that is not there
        return WeightsStatus(
            "missing", f"{what}: {source} is no folder here, nor a Hugging Face repo id", f"fix {setting}"
        )
    if cached:
        return WeightsStatus("downloaded")
    command = f"`easelbot models download {download}`"
    missing = "not downloaded" if what == _WEIGHTS else f"{what} ({source}) not downloaded"
    if config.engine.offline:
        return WeightsStatus(
            "not downloaded",
            f"{missing}, and engine.offline is set",
            f"run {command} once on a machine with network access",
        )
    return WeightsStatus(
        "to fetch", f"{missing} yet", f"the engine downloads it when first needed, or run {command} now"
    )


def _cached(config: Config, repo: str, filename: str) -> bool:
    from huggingface_hub import scan_cache_dir, try_to_load_from_cache
    from huggingface_hub.errors import CacheNotFound, CorruptedCacheException

    cache_dir = config.engine.cache_dir or None
    if filename:
        names = [_INDEX, filename] if filename == _UNET else [filename]
        return all(isinstance(try_to_load_from_cache(repo, name, cache_dir=cache_dir), str) for name in names)
    try:  # a LoRA repo without a named file: any .safetensors of it will do
        cache = scan_cache_dir(cache_dir)
    except (CacheNotFound, OSError, CorruptedCacheException):
        return False
    return any(
        info.repo_id == repo and any(f.file_name.endswith(".safetensors") for r in info.revisions for f in r.files)
        for info in cache.repos
    )


def _secrets(subject: str, needed: list[tuple[str, str]]) -> list[Finding]:
    return [
        Finding(subject, f"{variable} is not set ({why}); `easelbot run` stops at start-up without it")
        for variable, why in needed
        if not os.environ.get(variable, "").strip()
    ]
