"""Model weights from the Hugging Face Hub, for `easelbot models download`: which files of which repos, and one
clear line for each way a download fails (no network, offline mode, a gated or missing repo, a full disk)."""

from __future__ import annotations

import re
import sys
from collections.abc import Callable
from pathlib import Path

from bot.config import Config
from engine.config import TINY
from engine.errors import EaselError, UserError


def download(config: Config, name: str, *, report: Callable[[str], None]) -> None:
    """Download a configured model's weights (its inpainting checkpoint and LoRA too) or a repo by id into the
    Hugging Face cache, reporting each folder; UserError for a name that is neither, EaselError (one line saying
    what to do) when the hub cannot be reached or refuses."""
    spec = config.models.get(name)
    weights = ["*.json", "*.txt", "*.safetensors", "*.model"]
    if spec is not None:
        lora = [spec.lora_file] if spec.lora_file else ["*.safetensors"]  # a repo of many LoRAs: just the one
        sources = [(spec.source, weights), (spec.inpaint_source, weights), (spec.lora, lora)]
    elif name == TINY:
        report(
            f"`{TINY}` is built in: its random weights are made on this machine when first used; nothing to download."
        )
        return
    elif not Path(name).exists() and not _is_repo_id(name):
        configured = ", ".join(sorted(config.models)) or "none"
        raise UserError(
            f"`{name}` is neither a configured model nor a Hugging Face repo id (owner/name). Configured models: "
            f"{configured} (and `{TINY}`, built in, which needs no download)."
        )
    else:
        sources = [(name, weights)]
    from huggingface_hub import snapshot_download

    failures = _download_errors()
    for source, patterns in sources:
        if not source:
            continue
        if Path(source).exists():
            report(f"{source} is a local path; nothing to download")
            continue
        try:
            path = snapshot_download(
                source,
                cache_dir=config.engine.cache_dir or None,
                allow_patterns=patterns,
                ignore_patterns=["*.fp16.safetensors", "*.non_ema.*", "*.ema.*", "*pruned*"],
            )
        except failures as exc:
            raise EaselError(_download_failure(source, exc, config)) from None
        report(path)


def _is_repo_id(name: str) -> bool:
    """`owner/name` as the hub spells repo ids (its validator also refuses `--` and `..`)."""
    return re.fullmatch(r"[\w.-]+/[\w.-]{1,96}", name) is not None and "--" not in name and ".." not in name


def _download_errors() -> tuple[type[Exception], ...]:
    """What a download can raise: the hub's errors, OSError, and the HTTP client's transport errors (which
    huggingface_hub lets through unwrapped in places, e.g. a proxy's)."""
    from huggingface_hub.errors import HfHubHTTPError, HFValidationError

    found: list[type[Exception]] = [HfHubHTTPError, HFValidationError, OSError]
    for module in ("httpx", "httpx2"):  # whichever client this huggingface_hub uses, once it is imported
        error = getattr(sys.modules.get(module), "TransportError", None)
        if isinstance(error, type) and issubclass(error, Exception):
            found.append(error)
    return tuple(found)


def _download_failure(source: str, exc: Exception, config: Config) -> str:
    """One line saying why downloading `source` failed and what to do."""
    from huggingface_hub import constants
    from huggingface_hub.errors import (
        GatedRepoError,
        HfHubHTTPError,
        LocalEntryNotFoundError,
        OfflineModeIsEnabled,
        RepositoryNotFoundError,
    )

    chain: list[BaseException] = [exc]
    while chain[-1].__cause__ is not None and len(chain) < 10:
        chain.append(chain[-1].__cause__)
    answer = next((e for e in chain if isinstance(e, HfHubHTTPError)), None)  # the hub did answer, with an error
    where = f"Could not download {source}"
    if constants.HF_HUB_OFFLINE or any(isinstance(e, OfflineModeIsEnabled) for e in chain):
        return (
            f"{where}: offline mode is on (HF_HUB_OFFLINE or TRANSFORMERS_OFFLINE is set in the environment). "
            "Unset it and run this again on a machine with network access."
        )
    if isinstance(answer, GatedRepoError):
        return (
            f"{where}: the repo is gated. Accept its terms at {constants.ENDPOINT}/{source} and set HF_TOKEN to a "
            "token of that account."
        )
    if isinstance(answer, RepositoryNotFoundError):
        return (
            f"{where}: the Hugging Face Hub has no such repo (or it is private: then set HF_TOKEN). Check the "
            "name, or the model's source in the config."
        )
    if answer is not None:
        status = answer.response.status_code if answer.response is not None else 0
        advice = "Check HF_TOKEN" if status in (401, 403) else "Try again later"
        return f"{where}: {constants.ENDPOINT} answered HTTP {status or 'with an error'}. {advice}."
    if isinstance(exc, ValueError):  # HFValidationError: the hub's own rules for a repo id
        return f"{where}: {source} is not a valid Hugging Face repo id ({exc})."
    if isinstance(exc, OSError) and exc.strerror and not isinstance(exc, LocalEntryNotFoundError):
        folder = config.engine.cache_dir or constants.HF_HUB_CACHE
        return f"{where} into {folder}: {exc.strerror}."
    # No answer from the hub: huggingface_hub's "cannot find ... locally" wraps the connection error.
    cause = chain[-1]
    reason = (str(cause).strip().splitlines() or [""])[0]
    return (
        f"{where}: cannot reach {constants.ENDPOINT} ({type(cause).__name__}: {reason}). Check the network "
        "connection (or HTTPS_PROXY, HF_ENDPOINT); on a machine without network access, download elsewhere and "
        "copy the Hugging Face cache folder (engine.cache_dir)."
    )
