"""The `easelbot` command line.

    easelbot imagine PROMPT -o out.png        text-to-image, one shot, on this machine's GPU (or CPU)
    easelbot edit IMAGE PROMPT [--mask M]     img2img, or inpainting with a mask
    easelbot upscale IMAGE                    Stable Diffusion x4 upscaler
    easelbot models make-tiny DIR | list | download NAME
    easelbot config check [FILE]

The one-shot commands run the engine in this process (they import torch lazily); they are for
scripting and for checking a GPU box before wiring up a chat platform.
"""

from __future__ import annotations

import argparse
import logging
import os
import socket
import sys
import tempfile
from collections.abc import Sequence
from pathlib import Path

import msgspec

from bot.commands import Options, check_model
from bot.commands import build_request as build_job_request
from bot.config import Config, load_config
from engine.config import TINY
from engine.errors import ConfigError, EaselError, UserError
from engine.images import decode_image
from engine.protocol import (
    DEFAULT_GUIDANCE,
    DEFAULT_SCHEDULER,
    DEFAULT_STEPS,
    MIN_UPSCALE_SIDE,
    SCHEDULERS,
    Request,
    Task,
    validate,
)

log = logging.getLogger("easelbot")


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `easelbot` console script; returns the exit status."""
    parser = _parser()
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.DEBUG if args.verbose else logging.ERROR, format="%(levelname)s %(message)s")
    try:
        return int(args.func(args))
    except UserError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    except EaselError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:
        return 130
    except BrokenPipeError:
        if args.command not in _PRINTING:  # an engine's peer hanging up is no reader leaving a pipe
            raise
        # `easelbot config check | head`: the reader has gone, which is not an error
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no second error when Python flushes
        return 0


_PRINTING = ("config", "models")
"""Commands whose output is a report someone may pipe into `head`."""


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="easelbot", description="Share one GPU for Stable Diffusion from chat.")
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug details")
    parser.add_argument(
        "--config",
        type=Path,
        default=os.environ.get("EASELBOT_CONFIG") or None,
        help="TOML config file (default: $EASELBOT_CONFIG, else built-in defaults)",
    )
    commands = parser.add_subparsers(dest="command", required=True)

    imagine = commands.add_parser("imagine", help="text-to-image")
    imagine.add_argument("prompt")
    _sampling_options(imagine, Task.TXT2IMG)
    imagine.add_argument("--width", type=int, default=512)
    imagine.add_argument("--height", type=int, default=512)
    imagine.add_argument("-n", "--count", type=int, default=1, help="images to make, 1-4 (default 1)")
    imagine.set_defaults(func=_generate, task=Task.TXT2IMG)

    edit = commands.add_parser("edit", help="image-to-image, or inpainting with --mask")
    edit.add_argument("image", type=Path)
    edit.add_argument("prompt")
    edit.add_argument("--mask", type=Path, help="white = repaint, black = keep (resized to the image)")
    edit.add_argument("--strength", type=float, default=0.75, help="how much to change, 0-1 (default 0.75)")
    _sampling_options(edit, Task.IMG2IMG)
    edit.add_argument("--width", type=int, help="output width (default: the image's, fitted to the limits)")
    edit.add_argument("--height", type=int, help="output height (default: the image's, fitted to the limits)")
    edit.add_argument("-n", "--count", type=int, default=1, help="images to make, 1-4 (default 1)")
    edit.set_defaults(func=_generate, task=Task.IMG2IMG)

    upscale = commands.add_parser("upscale", help="Stable Diffusion x4 upscaler")
    upscale.add_argument("image", type=Path)
    upscale.add_argument("--prompt", default="", help="optional description of the image")
    upscale.add_argument("--noise-level", type=int, default=20, help="0-350 (default 20)")
    upscale.add_argument("--compare", action="store_true", help="also write a plain bicubic x4 (*-bicubic.png)")
    _sampling_options(upscale, Task.UPSCALE)
    upscale.set_defaults(func=_generate, task=Task.UPSCALE)

    run = commands.add_parser("run", help="run the bot: queue, engine child process and enabled adapters")
    run.set_defaults(func=_run)
    demo = commands.add_parser("demo", help="the offline demo: tiny model on this CPU, playground on 127.0.0.1")
    demo.add_argument(
        "--port", type=int, default=None, help="playground port (default: [web] port, 8080; 0 picks a free one)"
    )
    demo.set_defaults(func=_demo)
    engine = commands.add_parser(
        "engine", help="run a standalone engine: on a Unix socket (queue.engine_socket) or as a Redis worker"
    )
    where = engine.add_mutually_exclusive_group(required=True)
    where.add_argument("--socket", help="socket path to listen on")
    where.add_argument(
        "--redis",
        nargs="?",
        const="",
        metavar="URL",
        help="serve batches from Redis ([redis] table); URL default: $EASELBOT_REDIS_URL (keeps the password "
        "off the command line)",
    )
    engine.add_argument("--worker-id", default="", help="Redis worker id (default: HOST-PID)")
    engine.add_argument(
        "--models", default="", help="Redis worker: comma-separated models it serves (default: every configured one)"
    )
    engine.add_argument("--factory", help=argparse.SUPPRESS)  # module:function building the engine (tests)
    engine.set_defaults(func=_engine)
    workers = commands.add_parser("workers", help="list the Redis engine workers: GPU, models, load, last heartbeat")
    workers.set_defaults(func=_workers)

    models = commands.add_parser("models", help="manage models").add_subparsers(dest="action", required=True)
    tiny = models.add_parser("make-tiny", help="write the tiny random-weight model set (offline, seconds)")
    tiny.add_argument("directory", type=Path)
    tiny.set_defaults(func=_make_tiny)
    models.add_parser("list", help="list configured models").set_defaults(func=_list_models)
    download = models.add_parser("download", help="download a model's safetensors once, for offline use")
    download.add_argument("name", help="configured model name or Hugging Face repo id")
    download.set_defaults(func=_download)

    config = commands.add_parser("config", help="configuration").add_subparsers(dest="action", required=True)
    check = config.add_parser("check", help="validate a config file")
    check.add_argument("file", type=Path, nargs="?")
    check.set_defaults(func=_check_config)
    return parser


def _sampling_options(parser: argparse.ArgumentParser, task: Task) -> None:
    parser.add_argument(
        "-o",
        "--output",
        default=f"{task}.png",
        help=f"output PNG file (default {task}.png; a name without extension gets .png; an existing file is "
        "replaced); with -n N: NAME-1.png ... NAME-N.png",
    )
    parser.add_argument("--negative", default="", help="negative prompt: what to avoid")
    parser.add_argument("--steps", type=int, help=f"default: the model's, else {DEFAULT_STEPS[task]}")
    parser.add_argument(
        "--guidance", "--cfg", type=float, help=f"default: the model's, else {DEFAULT_GUIDANCE[task]:g}"
    )
    parser.add_argument("--seed", type=int, help="default: random (printed)")
    parser.add_argument(
        "--scheduler", choices=sorted(SCHEDULERS), help=f"default: the model's, else {DEFAULT_SCHEDULER[task]}"
    )
    parser.add_argument("--model", help=f"configured model name, or `{TINY}` for the offline demo model")


def build_request(args: argparse.Namespace, config: Config) -> tuple[Request, str]:
    """Turn parsed one-shot arguments into an engine request (reads input files, never loads torch), with a note
    for the user where the input image's size was not kept."""
    task: Task = args.task
    limits = config.limits
    image = _read(args.image, "image") if task is not Task.TXT2IMG else None
    mask = _read(args.mask, "mask") if getattr(args, "mask", None) else None
    width: int | None = getattr(args, "width", None)
    height: int | None = getattr(args, "height", None)
    if (width is None) != (height is None):
        raise UserError("Give both --width and --height, or neither (then the image's own size is used).")
    size = None
    if image is not None and width is None:
        what = "image to upscale" if task is Task.UPSCALE else "image"
        size = decode_image(image, what=what, max_pixels=limits.max_input_pixels, max_bytes=limits.max_input_bytes).size
    options = Options(
        prompt=args.prompt,
        negative=args.negative,
        width=width,
        height=height,
        seed=args.seed,
        steps=args.steps,
        guidance=args.guidance,
        count=getattr(args, "count", None),
        model=args.model,
        scheduler=args.scheduler,
        strength=getattr(args, "strength", None),
        noise_level=getattr(args, "noise_level", None),
    )
    request = build_job_request(
        task, options, config, image=image, image_size=size, mask=mask, compare=getattr(args, "compare", False)
    )
    note = ""
    if size is not None and size != (request.width, request.height):
        made = f"{request.width}x{request.height}"
        if task is Task.UPSCALE:
            if max(size) > limits.max_upscale_side:
                why = f", larger than [limits] max_upscale_side = {limits.max_upscale_side}"
            elif min(size) < MIN_UPSCALE_SIDE:
                why = f", smaller than the upscaler's {MIN_UPSCALE_SIDE} pixels a side"
            else:
                why = " (sides are multiples of 8)"
            note = (
                f"note: the image is {size[0]}x{size[1]}{why}; it is upscaled from {made} to "
                f"{request.width * 4}x{request.height * 4}."
            )
        else:
            note = (
                f"note: the image is {size[0]}x{size[1]}; the result is {made}, the nearest size [limits] allow "
                "(--width and --height choose another)."
            )
    return msgspec.structs.replace(request, job_id="cli"), note


def _read(path: Path, what: str) -> bytes:
    try:
        return path.read_bytes()
    except OSError as exc:
        raise UserError(f"Cannot read the {what} file {path}: {exc.strerror}.") from None


def _quiet_libraries(verbose: bool) -> None:
    """Keep diffusers/transformers load chatter and progress bars off the terminal (before they are imported)."""
    if not verbose:
        for name in ("TRANSFORMERS_VERBOSITY", "DIFFUSERS_VERBOSITY"):
            os.environ.setdefault(name, "error")
        os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")


def _generate(args: argparse.Namespace) -> int:
    config = load_config(args.config)
    request, note = build_request(args, config)
    # Everything that can be checked is checked before torch is imported: bad input fails in a blink.
    validate(request, config.limits)
    check_model(request, config, tiny=True)
    paths = output_paths(args.output, request, default=f"{args.task}.png")
    check_writable(paths)
    if note:
        print(note, file=sys.stderr)
    _quiet_libraries(args.verbose)
    from engine.oneshot import run_once

    for path in run_once(config, request, paths):
        print(path)
    if args.seed is None:
        print(f"seed: {request.seed}", file=sys.stderr)
    return 0


def output_paths(output: str, request: Request, *, default: str) -> list[Path]:
    """The files a one-shot request writes, from its `-o`: `out.png`, or `out-1.png` ... `out-N.png` for several
    images, then `out-bicubic.png` for an upscale's --compare. The output is always PNG (its parameters live in
    PNG text chunks): a name without extension gets `.png`, another extension is refused."""
    if output.endswith(("/", os.sep)) or Path(output).is_dir():
        raise UserError(f"-o {output} is a folder; name a file in it, e.g. -o {Path(output) / default}.")
    path = Path(output)
    if not path.suffix:
        path = path.with_name(f"{path.name}.png")
    elif path.suffix.lower() != ".png":
        raise UserError(
            f"-o {output}: the output is PNG (its parameters are stored in PNG text chunks); "
            f"use a .png name, e.g. -o {path.with_suffix('.png')}."
        )
    paths = [path]
    if request.count > 1:
        paths = [path.with_name(f"{path.stem}-{k}{path.suffix}") for k in range(1, request.count + 1)]
    if request.compare:
        paths.append(path.with_name(f"{path.stem}-bicubic{path.suffix}"))
    return paths


def check_writable(paths: list[Path]) -> None:
    """Refuse output files that could not be written, before the images are made: a folder in the way, a parent
    that is a file or cannot be created, a folder or file this process may not write."""
    probed: set[Path] = set()
    for path in paths:
        try:
            problem = _unwritable(path, probed)
        except OSError as exc:
            problem = exc.strerror or str(exc)
        if problem:
            raise UserError(f"Cannot write {path}: {problem}. Choose another -o path.")


def _unwritable(path: Path, probed: set[Path]) -> str:
    """Why `path` cannot be written, or "" (a file can still fail later, e.g. on a full disk)."""
    if path.is_dir():
        return "it is a folder"
    if path.exists():
        return "" if os.access(path, os.W_OK) else "it is read-only"
    parent = ancestor = path.parent
    while not ancestor.exists():  # the folders that writing it would create
        ancestor = ancestor.parent
    if not ancestor.is_dir():
        return f"{ancestor} is a file, not a folder"
    if ancestor in probed:
        return ""
    try:  # os.access says yes to root on /proc and the like: try it
        with tempfile.TemporaryFile(dir=ancestor):
            pass
    except OSError as exc:
        if ancestor == parent:
            return f"the folder {parent} is not writable ({exc.strerror})"
        return f"the folder {parent} cannot be created in {ancestor} ({exc.strerror})"
    probed.add(ancestor)
    return ""


def _run(args: argparse.Namespace) -> int:
    import asyncio

    from bot.service import run_service

    config = load_config(args.config)
    from bot.logs import configure

    configure("debug" if args.verbose else config.log.level, config.log.format)
    return asyncio.run(run_service(config))


def _demo(args: argparse.Namespace) -> int:
    import asyncio

    from bot.service import demo_config, run_service

    home = Path.home() / ".cache" / "easelbot" / "demo"
    config = demo_config(load_config(args.config), home)
    from bot.logs import configure

    configure("debug" if args.verbose else config.log.level, config.log.format)
    print(f"Starting the offline demo (tiny random-weight model; jobs in {home}). Ctrl-C stops it.", flush=True)
    return asyncio.run(run_service(config, port=args.port))


def _engine(args: argparse.Namespace) -> int:
    _quiet_libraries(args.verbose)
    if args.redis is not None:
        return _redis_worker(args)
    from engine.worker import main as engine_main

    return engine_main(["--socket", args.socket, *(["--factory", args.factory] if args.factory else [])])


def _redis_worker(args: argparse.Namespace) -> int:
    from engine.redis_protocol import redis_url

    config = load_config(args.config)
    url = redis_url(args.redis or None)
    models = [name.strip() for name in args.models.split(",") if name.strip()]
    known = {*config.models, TINY}
    for name in models:
        if name not in known:
            raise ConfigError(f"--models names unknown model {name!r}; configured: {sorted(known)}.")
    from engine.redis_worker import serve
    from engine.worker import load_factory

    logging.getLogger("easelbot.engine").setLevel(logging.INFO if args.verbose else logging.WARNING)
    logging.basicConfig(level=logging.WARNING, format="engine %(levelname)s %(message)s", force=True)
    worker_id = args.worker_id or f"{socket.gethostname()}-{os.getpid()}"
    return serve(
        url, config.redis, config.engine_settings(), load_factory(args.factory), worker_id=worker_id, models=models
    )


def _workers(args: argparse.Namespace) -> int:
    import asyncio

    from bot.redis_transport import RedisTransport, describe_workers

    config = load_config(args.config)
    transport = RedisTransport.from_environment(config.redis)

    async def listing() -> str:
        try:
            await transport.connect()
            return describe_workers(await transport.workers())
        finally:
            await transport.close()

    print(asyncio.run(listing()))
    return 0


def _make_tiny(args: argparse.Namespace) -> int:
    _quiet_libraries(args.verbose)
    from engine.tiny import make_tiny

    print(make_tiny(args.directory))
    return 0


def _list_models(args: argparse.Namespace) -> int:
    from bot.preflight import weights

    config = load_config(args.config)
    width = max(12, *map(len, config.models))  # the name column: at least 12 wide, so the others line up
    print(f"{'MODEL':{width}} {'KIND':11}  {'WEIGHTS':14}  SOURCE")
    print(f"{TINY:{width}} {'sd+upscaler':11}  {'built in':14}  random-weight demo set (offline)")
    todo = []
    for name, spec in sorted(config.models.items()):
        lora = f" + LoRA {spec.lora}" if spec.lora else ""
        status = weights(config, spec, name)
        print(f"{name:{width}} {spec.kind:11}  {status.label:14}  {spec.source}{lora}")
        if not status.ready:
            todo.append(f"{name}: {status}")
    if todo:
        print("\n" + "\n".join(todo))
    return 0


def _download(args: argparse.Namespace) -> int:
    from bot.downloads import download

    download(load_config(args.config), args.name, report=print)
    return 0


def _check_config(args: argparse.Namespace) -> int:
    path = args.file or args.config
    if path is None:
        raise ConfigError("Name a config file: `easelbot config check FILE` (or set EASELBOT_CONFIG).")
    config = load_config(path)
    print(f"{path}: OK ({len(config.models)} models; default {config.engine.default_model})")
    from bot.preflight import environment

    findings = environment(config)  # advice: the file is valid either way (e.g. checked while building an image)
    if not findings:
        print("This machine is ready for `easelbot run`: the secrets it needs are set and the models are on disk.")
        return 0
    print("Before `easelbot run` on this machine:")
    for finding in findings:
        print(f"  {'problem' if finding.problem else 'note':7}  {finding.subject}: {finding.text}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
