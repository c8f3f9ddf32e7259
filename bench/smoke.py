"""GPU smoke test: every engine task once on full-size architectures with random weights.

    PYTHONUNBUFFERED=1 python bench/smoke.py --out bench/results/smoke-h100.json
    python bench/smoke.py --tiny            # the same code path on the tiny models, on any CPU
    python bench/smoke.py --models /tmp/m   # build the models in /tmp/m once, reuse them next time

Builds the Stable Diffusion 1.5 architecture (UNet, VAE, CLIP ViT-L text encoder) and the x4
upscaler architecture (UNet, VAE, OpenCLIP ViT-H text encoder) with random weights, saves them as
diffusers folders (safetensors, float16) and loads them through the engine's own `from_pretrained` path, so
nothing is downloaded. The timing of a network does not depend on its weight values. Each task runs
once to warm up and `--repeat` (3) times timed, on an engine built as the engine process builds it
(previews and PNGs encoded on the finisher thread), each run timed to its last PNG; the JSON printed
(and written with --out) holds the median seconds (and each run's), the PNG encoding's and the VAE
decode's share of them, output sizes and GPU memory per task. The PNG share is the task's images
re-encoded one after another (the engine encodes a job's images side by side, so for several images
it overstates); the float16 VAE redo count is over all of a task's timed runs.
`--compile-upscale --upscale-only` times the two upscales with the upscaler's UNet compiled for their
inputs (target 3 with the speed-up that is off by default).

Target 3 as a ratio: before the engine loads anything, diffusers' stock `StableDiffusionUpscalePipeline`
upscales 128->512 and 512->2048 alone on the GPU (a warm-up and `--repeat` timed runs per size, PNG encoded),
with its own peak memory; `upscale vs stock pipeline` puts the engine's figures beside it. The engine
keeps the SD model resident while it upscales, so each upscale also reports its peak less the SD
weights (`peak_allocated_without_sd_gib`): what it needs with the upscaler alone loaded.
"""

from __future__ import annotations

import argparse
import gc
import io
import platform
import shutil
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
from diffusers import (
    AutoencoderKL,
    DDIMScheduler,
    DDPMScheduler,
    PNDMScheduler,
    StableDiffusionPipeline,
    StableDiffusionUpscalePipeline,
    UNet2DConditionModel,
)
from PIL import Image
from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

from bench import workload
from bench.report import emit, save
from bench.workload import Redos
from engine import sampling, upscale
from engine.config import EngineConfig, ModelKind, ModelSpec, Settings, SpeedConfig
from engine.engine import Engine
from engine.images import PARALLEL_PNG_PIXELS, encode_png
from engine.protocol import Done, Event, Request, Task
from engine.tiny import make_tiny

_SCALED_LINEAR = {"beta_start": 0.00085, "beta_end": 0.012, "beta_schedule": "scaled_linear"}


def _sd15_unet() -> UNet2DConditionModel:
    return UNet2DConditionModel(
        sample_size=64,
        in_channels=4,
        out_channels=4,
        block_out_channels=(320, 640, 1280, 1280),
        layers_per_block=2,
        cross_attention_dim=768,
        attention_head_dim=8,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "DownBlock2D"),
        up_block_types=("UpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
    )


def _vae(levels: int, scaling_factor: float) -> AutoencoderKL:
    channels = (128, 256, 512, 512)[:levels]
    return AutoencoderKL(
        in_channels=3,
        out_channels=3,
        latent_channels=4,
        block_out_channels=channels,
        down_block_types=("DownEncoderBlock2D",) * levels,
        up_block_types=("UpDecoderBlock2D",) * levels,
        layers_per_block=2,
        scaling_factor=scaling_factor,
    )


def _text_encoder(hidden: int, layers: int, heads: int, act: str, projection: int) -> CLIPTextModel:
    config = CLIPTextConfig(
        vocab_size=49408,
        hidden_size=hidden,
        intermediate_size=hidden * 4,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        max_position_embeddings=77,
        hidden_act=act,
        projection_dim=projection,
    )
    return CLIPTextModel(config)


def _upscaler_unet() -> UNet2DConditionModel:
    return UNet2DConditionModel(
        sample_size=128,
        in_channels=7,
        out_channels=4,
        block_out_channels=(256, 512, 512, 1024),
        layers_per_block=2,
        cross_attention_dim=1024,
        attention_head_dim=8,
        num_class_embeds=1000,
        only_cross_attention=(True, True, True, False),
        use_linear_projection=True,
        down_block_types=("DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"),
    )


def build_full_size(root: Path, tokenizer_dir: Path) -> tuple[Path, Path]:
    """Write random-weight SD1.5 and x4-upscaler diffusers folders under `root`, in float16 (half the bytes
    to write and read; the engine loads every module in float16 on a GPU, the upscaler's VAE in float32)."""
    tokenizer = CLIPTokenizer.from_pretrained(tokenizer_dir)
    torch.manual_seed(0)
    sd = StableDiffusionPipeline(
        unet=_sd15_unet(),
        vae=_vae(4, 0.18215),
        text_encoder=_text_encoder(768, 12, 12, "quick_gelu", 768),
        tokenizer=tokenizer,
        scheduler=PNDMScheduler(**_SCALED_LINEAR, skip_prk_steps=True, steps_offset=1, set_alpha_to_one=False),
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    sd.to(torch.float16).save_pretrained(root / "sd15", safe_serialization=True)
    del sd
    upscaler = StableDiffusionUpscalePipeline(
        unet=_upscaler_unet(),
        vae=_vae(3, 0.08333),
        text_encoder=_text_encoder(1024, 23, 16, "gelu", 512),
        tokenizer=tokenizer,
        scheduler=DDIMScheduler(
            beta_start=0.0001,
            beta_end=0.02,
            beta_schedule="scaled_linear",
            prediction_type="v_prediction",
            clip_sample=False,
            set_alpha_to_one=False,
            steps_offset=1,
        ),
        low_res_scheduler=DDPMScheduler(beta_start=0.0001, beta_end=0.02, beta_schedule="scaled_linear"),
        max_noise_level=350,
    )
    upscaler.to(torch.float16).save_pretrained(root / "x4", safe_serialization=True)
    return root / "sd15", root / "x4"


FULL_SIZE_MARKER = ".full-size-complete"
"""Written last into a models folder once both full-size models are saved there."""

MODELS_HELP = "build the models in this folder, or reuse the ones an earlier run built there (default: a temporary one)"


def build_models(work: Path, *, tiny: bool) -> tuple[Path, Path]:
    """The SD and x4-upscaler model folders under `work`: the tiny set, or full-size random weights, built
    unless a complete set is already there (the benchmarks of one GPU session share one `--models` folder)."""
    tiny_root = make_tiny(work / "tiny")
    if tiny:
        return tiny_root / "txt2img", tiny_root / "upscaler"
    if (work / FULL_SIZE_MARKER).exists():
        return work / "sd15", work / "x4"
    folders = build_full_size(work, tiny_root / "txt2img" / "tokenizer")
    (work / FULL_SIZE_MARKER).write_text("sd15 x4\n", encoding="utf-8")
    return folders


def _png(width: int, height: int) -> bytes:
    buffer = io.BytesIO()
    Image.radial_gradient("L").convert("RGB").resize((width, height)).save(buffer, format="PNG")
    return buffer.getvalue()


def _cases(tiny: bool) -> list[tuple[str, Request]]:
    side, steps = (64, 3) if tiny else (512, 30)
    small, large = (32, 64) if tiny else (128, 512)
    image = _png(side, side)
    mask = Image.new("L", (side, side), 0)
    mask.paste(255, (side // 4, side // 4, 3 * side // 4, 3 * side // 4))
    buffer = io.BytesIO()
    mask.save(buffer, format="PNG")
    common: dict[str, Any] = {"seed": 1, "prompt": "a red fox in the snow, detailed photo", "steps": steps}
    return [
        ("txt2img", Request(job_id="txt2img", task=Task.TXT2IMG, model="sd", width=side, height=side, **common)),
        (
            "txt2img x4 images",
            Request(job_id="txt2img4", task=Task.TXT2IMG, model="sd", width=side, height=side, count=4, **common),
        ),
        (
            "img2img",
            Request(job_id="img2img", task=Task.IMG2IMG, model="sd", width=side, height=side, image=image, **common),
        ),
        (
            "inpaint",
            Request(
                job_id="inpaint",
                task=Task.INPAINT,
                model="sd",
                width=side,
                height=side,
                image=image,
                mask=buffer.getvalue(),
                strength=1.0,
                **common,
            ),
        ),
        *[
            (
                f"upscale {n}->{4 * n}",
                Request(
                    job_id=f"upscale{n}",
                    task=Task.UPSCALE,
                    model="x4",
                    seed=1,
                    steps=3 if tiny else 20,
                    guidance=9.0,
                    scheduler="ddim",
                    width=n,
                    height=n,
                    image=_png(n, n),
                ),
            )
            for n in (small, large)
        ],
    ]


def _speed(args: argparse.Namespace) -> SpeedConfig:
    """Uncompiled (the default), every default txt2img bucket (`--compile`), or only the upscaler's UNet for the
    two upscale inputs (`--compile-upscale`; with --tiny through torch.compile's `eager` backend, as the test
    suite runs it)."""
    if args.compile_upscale:
        sides = (32, 64) if args.tiny else (128, 512)
        backend = "eager" if args.tiny else "inductor"
        upscale_sizes = [[side, side] for side in sides]
        return SpeedConfig(compile=True, sizes=[], upscale_sizes=upscale_sizes, compile_backend=backend)
    return SpeedConfig() if args.compile else SpeedConfig(compile=False)


class DecodeTimer:
    """Seconds spent in the engine's VAE decode and 8-bit conversion (`engine.sampling._decode` and
    `engine.upscale._decode`, the device synchronized before and after) while attached: the share of a task
    that is not the denoising loop or the PNGs."""

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.seconds = 0.0
        self._saved: list[tuple[Any, Any]] = []

    def __enter__(self) -> DecodeTimer:
        for module in (sampling, upscale):
            original = module._decode
            self._saved.append((module, original))
            module._decode = self._timing(original)  # type: ignore[attr-defined]
        return self

    def __exit__(self, *exc: object) -> None:
        for module, original in self._saved:
            module._decode = original
        self._saved.clear()

    def _timing(self, decode: Any) -> Any:
        def timed(*args: Any, **kwargs: Any) -> Any:
            workload.sync(self.device)
            started = time.perf_counter()
            try:
                return decode(*args, **kwargs)
            finally:
                workload.sync(self.device)
                self.seconds += time.perf_counter() - started

        return timed


def _timed(engine: Engine, request: Request, device: torch.device, redos: Redos, repeat: int) -> dict[str, Any]:
    """`repeat` timed runs of `request`, each to its last PNG: the median seconds (and each run's), with the
    memory of the last run; `redos` is attached for these runs only."""
    events: list[Event] = []
    resident = torch.cuda.memory_allocated() / workload.GIB if device.type == "cuda" else 0.0
    runs = []
    with DecodeTimer(device) as decoding:
        for _ in range(repeat):
            events.clear()
            workload.reset_peak(device)
            started = time.perf_counter()
            engine.run([request], events.append)
            engine.drain()
            workload.sync(device)
            runs.append(time.perf_counter() - started)
    seconds = workload.summary(runs)["median"]
    figures = workload.memory(device)
    end = events[-1]
    if not isinstance(end, Done):
        raise SystemExit(f"{request.job_id} failed: {end}")
    decoded = [Image.open(io.BytesIO(image.png)) for image in end.images]
    for image in decoded:
        image.load()
    encoding = time.perf_counter()
    for image in decoded:  # again, as the engine encoded them (parameters included): their share of `seconds`
        encode_png(image, parameters=request.parameters())
    png_seconds = time.perf_counter() - encoding
    first = decoded[0]
    pillow: dict[str, float] = {}
    if first.width * first.height >= PARALLEL_PNG_PIXELS:  # encoded in parallel bands: Pillow's time beside it
        encoding = time.perf_counter()
        first.save(io.BytesIO(), format="PNG", compress_level=4)  # the level encode_png uses
        pillow = {"pillow png_seconds of one image (for comparison)": round(time.perf_counter() - encoding, 3)}
    result: dict[str, Any] = {
        "seconds": round(seconds, 3),
        "seconds (each run)": workload.summary(runs),
        "png_seconds (included in seconds)": round(png_seconds, 3),
        "vae decode seconds (included in seconds; mean of the runs)": round(decoding.seconds / repeat, 3),
        "images": len(end.images),
        "output": f"{first.width}x{first.height}",
        "float16 VAE decodes redone in float32": redos.count,
        **pillow,
    }
    if figures:
        result |= {"resident_gib (before the task)": round(resident, 2), **figures}
        result["peak_gib"] = figures["peak_allocated_gib"]
    return result


def plain_upscale(
    x4_dir: Path, device: torch.device, dtype: torch.dtype, sides: list[int], *, steps: int, repeat: int
) -> dict[str, Any]:
    """diffusers' stock StableDiffusionUpscalePipeline (its VAE upcast to float32 as its config asks, untiled),
    alone on the device: per input side a warm-up, then `repeat` timed runs to PNG bytes (the median, and the
    last run's PNG time and peak memory)."""
    pipe = StableDiffusionUpscalePipeline.from_pretrained(x4_dir, torch_dtype=dtype).to(device)
    pipe.set_progress_bar_config(disable=True)
    out: dict[str, Any] = {}
    for side in sides:
        image = Image.radial_gradient("L").convert("RGB").resize((side, side))

        def call(source: Image.Image = image) -> Image.Image:
            generator = torch.Generator("cpu").manual_seed(1)
            upscaled: Image.Image = pipe(
                "a photo", image=source, num_inference_steps=steps, guidance_scale=9.0, generator=generator
            ).images[0]
            return upscaled

        call()  # warm-up at this size
        runs = []
        for _ in range(repeat):
            workload.reset_peak(device)
            started = time.perf_counter()
            upscaled = call()
            workload.sync(device)
            encoding = time.perf_counter()
            workload.png(upscaled)
            done = time.perf_counter()
            runs.append(done - started)
        out[f"{side}->{4 * side}"] = {
            "seconds": workload.summary(runs)["median"],
            "seconds (each run)": workload.summary(runs),
            "png_seconds (included in seconds)": round(done - encoding, 3),
            "output": f"{upscaled.width}x{upscaled.height}",
            **workload.memory(device),
        }
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tiny", action="store_true", help="tiny models and sizes (any CPU, seconds)")
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    parser.add_argument("--models", type=Path, help=MODELS_HELP)
    parser.add_argument("--tile", type=int, help="upscale UNet tile side (default: engine.upscale_tile's)")
    compiling = parser.add_mutually_exclusive_group()
    compiling.add_argument(
        "--compile", action="store_true", help="compile the UNet buckets at start-up ([engine.speed] compile = auto)"
    )
    parser.add_argument(
        "--no-plain-upscale", action="store_true", help="skip the stock upscale pipeline (target 3's baseline)"
    )
    compiling.add_argument(
        "--compile-upscale",
        action="store_true",
        help="compile only the upscaler's UNet, for both inputs the upscales use (128 and 512 px; 32 and 64 with "
        "--tiny), at start-up ([engine.speed] upscale_sizes)",
    )
    parser.add_argument("--upscale-only", action="store_true", help="run only the two upscales")
    parser.add_argument("--repeat", type=int, default=3, help="timed runs per task; the median is reported (3)")
    args = parser.parse_args()
    if args.repeat < 1:
        parser.error(f"--repeat must be at least 1, not {args.repeat}")
    work = Path(tempfile.mkdtemp(prefix="easelbot-smoke-"))
    try:
        started = time.perf_counter()
        sd_dir, x4_dir = build_models(args.models or work, tiny=args.tiny)
        build_seconds = time.perf_counter() - started
        models = {
            "sd": ModelSpec(source=str(sd_dir)),
            "x4": ModelSpec(source=str(x4_dir), kind=ModelKind.UPSCALER),
        }
        stock: dict[str, Any] = {}
        if not args.no_plain_upscale:
            device, dtype = workload.device()
            sides = [32, 64] if args.tiny else [128, 512]
            stock = plain_upscale(x4_dir, device, dtype, sides, steps=3 if args.tiny else 20, repeat=args.repeat)
            gc.collect()
            if device.type == "cuda":
                torch.cuda.empty_cache()
        tiles: dict[str, Any] = {}
        if args.tiny:
            tiles = {"upscale_tile": 32, "upscale_tile_overlap": 8, "upscale_vae_tile": 32}
        elif args.tile:
            tiles = {"upscale_tile": args.tile, "upscale_tile_overlap": args.tile // 8}
        config = EngineConfig(
            default_model="sd",
            default_upscaler="x4",
            offline=True,
            preload=["sd", "x4"],
            preview_every=5,
            speed=_speed(args),
            **tiles,
        )
        engine = Engine(Settings(engine=config, models=models), finish_async=True)
        started = time.perf_counter()
        engine.preload()
        load_seconds = time.perf_counter() - started
        device = engine.store.device
        report: dict[str, Any] = {
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu",
            "dtype": str(engine.store.dtype),
            # What the weights really are after loading, not what was asked (diffusers' from_pipe once cast them).
            "unet dtypes": sorted(
                {str(p.dtype) for p in engine.store.sd("sd", Task.TXT2IMG).img2img.unet.parameters()}
            ),
            "torch": torch.__version__,
            "models": "tiny" if args.tiny else "full-size SD1.5 + x4 upscaler architectures, random weights",
            "build_seconds": round(build_seconds, 1),
            "load_seconds": round(load_seconds, 1),
            "compiled": engine.store.compiled(),
            "warmup_seconds": round(engine.store.warmup_seconds(), 1),
            "previews": "every 5 steps, encoded on the finisher thread as in the engine process",
            "stock upscale pipeline": stock,
            "tasks": {},
        }
        if device.type == "cuda":
            sd = engine.store.sd("sd", Task.TXT2IMG).txt2img
            report["sd_weights_gib"] = workload.module_gib(sd.unet, sd.vae, sd.text_encoder)
        save(report, args.out)
        for name, request in _cases(args.tiny):
            if args.upscale_only and request.task is not Task.UPSCALE:
                continue
            engine.run([request], lambda _: None)  # warm-up
            engine.drain()
            with Redos() as redos:
                task = _timed(engine, request, device, redos, args.repeat)
            if request.task is Task.UPSCALE and "sd_weights_gib" in report:
                task["peak_allocated_without_sd_gib"] = round(task["peak_allocated_gib"] - report["sd_weights_gib"], 2)
            report["tasks"][name] = task
            print(f"{name}: {task}", file=sys.stderr, flush=True)
            size = name.removeprefix("upscale ")
            if request.task is Task.UPSCALE and size in stock:
                plain = stock[size]
                report.setdefault("upscale vs stock pipeline", {})[size] = {
                    "stock seconds": plain["seconds"],
                    "easelbot seconds": task["seconds"],
                    "ratio (stock / easelbot)": round(plain["seconds"] / task["seconds"], 2),
                    "stock peak_allocated_gib": plain.get("peak_allocated_gib"),
                    "easelbot peak_allocated_without_sd_gib": task.get("peak_allocated_without_sd_gib"),
                }
            save(report, args.out)
        engine.close()
        emit(report, args.out)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
