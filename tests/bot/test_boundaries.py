"""Process boundaries: the bot side never imports the GPU stack, and the console script is installed."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

BOT_SIDE = (
    "bot.cli",
    "bot.config",
    "bot.jobs",
    "bot.store",
    "bot.scheduler",
    "bot.engine_client",
    "bot.queue",
    "bot.service",
    "bot.chat",
    "bot.commands",
    "bot.metrics",
    "bot.adapters.web",
    "bot.adapters.discord",
    "bot.adapters.slack",
    "bot.redis_transport",
    "bot.redis_dispatch",
    "engine.protocol",
    "engine.errors",
    "engine.config",
    "engine.images",
    "engine.channel",
)
GPU_STACK = ("torch", "diffusers", "transformers")
ROOT = Path(__file__).resolve().parents[2]


def _python(code: str, cwd: Path) -> subprocess.CompletedProcess[str]:
    """Run `code` in a fresh interpreter that finds the project, with no EASELBOT_CONFIG."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    env.pop("EASELBOT_CONFIG", None)
    return subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, timeout=60, check=False, cwd=cwd, env=env
    )


def test_bot_side_modules_do_not_import_torch_diffusers_or_transformers() -> None:
    """Importing the bot's modules and the shared contract leaves torch, diffusers and transformers unloaded."""
    code = (
        "import sys\n"
        f"for name in {BOT_SIDE!r}:\n"
        "    __import__(name)\n"
        f"loaded = sorted(m for m in sys.modules if m.split('.')[0] in {GPU_STACK!r})\n"
        "print(','.join(loaded))\n"
    )
    result = _python(code, ROOT)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == "", f"the bot side imported: {result.stdout.strip()}"


def test_bad_one_shot_input_fails_without_importing_torch(tmp_path: Path) -> None:
    """`easelbot imagine ""` is refused by the bot-side check, before the engine (and torch) is loaded."""
    code = (
        "import sys\n"
        "from bot.cli import main\n"
        "status = main(['imagine', '', '-o', 'never.png'])\n"
        f"loaded = sorted(m for m in sys.modules if m.split('.')[0] in {GPU_STACK!r})\n"
        "print(status, ','.join(loaded))\n"
    )
    result = _python(code, tmp_path)
    assert result.returncode == 0, result.stderr
    assert result.stdout.split() == ["2"], result.stdout
    assert "The prompt is empty" in result.stderr


def test_console_script_help_runs() -> None:
    """The `easelbot` console script next to the interpreter runs `--help` and lists the commands."""
    script = Path(sys.executable).with_name("easelbot")
    assert script.is_file(), f"no console script at {script}; install the project (pip install -e .)"
    result = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=60, check=False)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith("usage: easelbot")
    for command in ("imagine", "edit", "upscale", "models", "config"):
        assert command in result.stdout
