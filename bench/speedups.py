"""What each speed-up buys: plain diffusers beside the engine with each `[engine.speed]` choice, one run.

    PYTHONUNBUFFERED=1 python bench/speedups.py --out bench/results/speedups-h100.json
    PYTHONUNBUFFERED=1 python bench/speedups.py --only compile --out bench/results/speedups-compile-h100.json
    python bench/speedups.py --only none --only tf32 --no-upscale --models /tmp/m   # some rows, built models kept
    python bench/speedups.py --tiny         # the same code path on the tiny models, on any CPU

On the full-size SD1.5 and x4-upscaler architectures with random weights (bench/smoke.py builds
them; nothing is downloaded), in one process on one device:

- txt2img 512x512, 30 steps DPM++, CFG 7.5, as 1 job and as 8 one-image jobs in one batch:
  `StableDiffusionPipeline` (one prompt per call; 8 prompts per call), then `Engine.run` (to PNG
  bytes) with no speed-up, with each speed-up alone, and with the default choices;
- the opt-in few-step model: a (random) LoRA fused in, LCM scheduler, 4 steps, guidance 1 (no CFG
  rows), with the default speed choices, against the same 30-step plain figures: what a user who
  picks `--model fast` gets, at lower quality;
- x4 upscale 128->512 and 512->2048, 20 steps: `StableDiffusionUpscalePipeline`, then the engine
  with the float32 VAE, the guarded float16 VAE, and VAE tiles; with peak GPU memory.

Every figure is the median of `--repeat` timed runs after a warm-up of the same shape; compile
start-up cost is reported as `warmup_seconds`. Ratios are plain seconds / engine seconds.
"""

from __future__ import annotations

import argparse
import functools
import gc
import json
import shutil
import statistics
import sys
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
from diffusers import DPMSolverMultistepScheduler, StableDiffusionPipeline, StableDiffusionUpscalePipeline
from msgspec.structs import replace
from PIL import Image

from bench import workload
from bench.report import emit, save
from bench.smoke import MODELS_HELP, build_models
from engine.config import EngineConfig, ModelKind, ModelSpec, Settings, SpeedConfig
from engine.engine import Engine
from engine.protocol import Done, Event, Request, Task
from engine.tiny import make_lora

NONE = SpeedConfig(tf32=False, channels_last=False, fuse_qkv=False, compile=False, vae_fp16=False)

FEW_STEP = "few-step model (LoRA fused, lcm, 4 steps, guidance 1)"
FEW_STEP_REQUEST = {"scheduler": "lcm", "steps": 4, "guidance": 1.0}


def sd_variants(tiny: bool, rows: list[int], side: int) -> dict[str, SpeedConfig]:
    """The txt2img configurations compared (compiled ones only for the shapes timed)."""
    backend = {"compile_backend": "eager"} if tiny else {}
    buckets: dict[str, Any] = {"sizes": [[side, side]], "batches": rows, **backend}
    return {
        "none": NONE,
        "tf32": replace(NONE, tf32=True),
        "channels_last": replace(NONE, channels_last=True),
        "fuse_qkv": replace(NONE, fuse_qkv=True),
        "compile default": replace(NONE, compile=True, compile_mode="default", **buckets),
        "compile reduce-overhead": replace(NONE, compile=True, **buckets),
        "all (defaults)": SpeedConfig(compile=True, channels_last=True, fuse_qkv=True, **buckets),
    }


def _measure(device: torch.device, repeat: int, work: Callable[[], object]) -> dict[str, Any]:
    """Median seconds of `repeat` runs after one warm-up, and the peak GPU memory."""
    work()
    times = []
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    for _ in range(repeat):
        workload.sync(device)
        started = time.perf_counter()
        work()
        workload.sync(device)
        times.append(time.perf_counter() - started)
    result: dict[str, Any] = {"seconds": round(statistics.median(times), 4)}
    if device.type == "cuda":
        result["peak_gib"] = round(torch.cuda.max_memory_allocated() / 2**30, 2)
    return result


def _free() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def plain_sd(model_dir: Path, device: torch.device, dtype: torch.dtype, shape: dict[str, int]) -> dict[str, Any]:
    """Stock StableDiffusionPipeline, one prompt per call and 8 per call, to PNG bytes."""
    pipe = StableDiffusionPipeline.from_pretrained(model_dir, torch_dtype=dtype, safety_checker=None).to(device)
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config, algorithm_type="dpmsolver++")
    pipe.set_progress_bar_config(disable=True)

    def call(n: int) -> None:
        gens = [torch.Generator("cpu").manual_seed(k) for k in range(n)]
        images = pipe(
            workload.PROMPTS[:n],
            height=shape["side"],
            width=shape["side"],
            num_inference_steps=shape["steps"],
            guidance_scale=7.5,
            generator=gens,
        ).images
        [workload.png(image) for image in images]

    return {f"{n} images": _measure(device, shape["repeat"], functools.partial(call, n)) for n in (1, 8)}


def _run(engine: Engine, requests: list[Request]) -> None:
    """One batch to finished PNG bytes (waits for the engine's background finishing too)."""
    events: list[Event] = []
    engine.run(requests, events.append)
    drain = getattr(engine, "drain", None)
    if drain is not None:
        drain()
    done = [event for event in events if isinstance(event, Done)]
    if len(done) != len(requests):
        raise SystemExit(f"a job did not finish: {[e for e in events if not isinstance(e, Done)][-1:]}")


def engine_sd(settings: Settings, shape: dict[str, int], fields: dict[str, Any] | None = None) -> dict[str, Any]:
    """The engine on one batch of 1 and of 8 one-image jobs (request `fields` changed), with its start-up
    (compile) cost."""
    started = time.perf_counter()
    engine = Engine(settings)
    engine.store.sd("sd", Task.TXT2IMG)
    out: dict[str, Any] = {
        "load_seconds": round(time.perf_counter() - started, 2),
        **engine.store.speed_summary(),
    }
    device = engine.store.device
    for n in (1, 8):
        requests = [
            replace(workload.txt2img(k, side=shape["side"], steps=shape["steps"], job_id=f"job{k}"), **(fields or {}))
            for k in range(n)
        ]
        out[f"{n} images"] = _measure(device, shape["repeat"], functools.partial(_run, engine, requests))
    stats = engine.store.sd("sd", Task.TXT2IMG).denoiser.stats
    out["compiled_calls"], out["eager_calls"] = stats.compiled_calls, stats.eager_calls
    close = getattr(engine, "close", None)
    if close is not None:
        close()
    return out


def upscale(x4_dir: Path, device: torch.device, dtype: torch.dtype, sides: list[int], tiny: bool) -> dict[str, Any]:
    """Stock StableDiffusionUpscalePipeline, then the engine's VAE choices, per input side."""
    steps, repeat = (3, 1) if tiny else (20, 2)
    out = _plain_upscale(x4_dir, device, dtype, sides, steps=steps, repeat=repeat)
    _free()
    tiles: dict[str, Any] = {"upscale_vae_tile": 32, "upscale_tile_overlap": 8} if tiny else {}
    whole = {"upscale_vae_tile": 1024}
    fp16 = replace(NONE, vae_fp16=True)
    variants: dict[str, dict[str, Any]] = {
        "float32 VAE": {"speed": NONE, **whole},
        "float16 VAE": {"speed": fp16, **whole},
        "float16 VAE, tiles": {"speed": fp16, **tiles},
        "defaults": tiles,
    }
    for name, extra in variants.items():
        config = EngineConfig(default_upscaler="x4", offline=True, **extra)
        engine = Engine(Settings(engine=config, models={"x4": ModelSpec(source=str(x4_dir), kind=ModelKind.UPSCALER)}))
        for side in sides:
            request = Request(
                job_id="up",
                task=Task.UPSCALE,
                model="x4",
                seed=1,
                prompt="a photo",
                steps=steps,
                guidance=9.0,
                scheduler="ddim",
                width=side,
                height=side,
                image=workload.png(_gradient(side)),
            )
            out[f"{name} {side}->{4 * side}"] = _measure(device, repeat, functools.partial(_run, engine, [request]))
        _free()
    return out


def _gradient(side: int) -> Image.Image:
    return Image.radial_gradient("L").convert("RGB").resize((side, side))


def _plain_upscale(
    x4_dir: Path, device: torch.device, dtype: torch.dtype, sides: list[int], *, steps: int, repeat: int
) -> dict[str, Any]:
    """Stock StableDiffusionUpscalePipeline (float32 VAE where its config asks, untiled) per input side."""
    pipe = StableDiffusionUpscalePipeline.from_pretrained(x4_dir, torch_dtype=dtype).to(device)
    pipe.set_progress_bar_config(disable=True)

    def call(image: Image.Image) -> None:
        output = pipe(
            "a photo", image=image, num_inference_steps=steps, generator=torch.Generator("cpu").manual_seed(1)
        )
        workload.png(output.images[0])

    return {
        f"plain {side}->{4 * side}": _measure(device, repeat, functools.partial(call, _gradient(side)))
        for side in sides
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--tiny", action="store_true", help="tiny models and sizes (any CPU)")
    parser.add_argument("--only", action="append", help="run only the txt2img variants whose name contains this")
    parser.add_argument("--no-upscale", action="store_true", help="skip the upscaler comparison")
    parser.add_argument("--repeat", type=int, default=3, help="timed runs per figure (median reported)")
    parser.add_argument("--models", type=Path, help=MODELS_HELP)
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    args = parser.parse_args()
    device, dtype = workload.device()
    shape = {"side": 64, "steps": 3, "repeat": 1} if args.tiny else {"side": 512, "steps": 30, "repeat": args.repeat}
    work = Path(tempfile.mkdtemp(prefix="easelbot-speedups-"))
    try:
        sd_dir, x4_dir = build_models(args.models or work, tiny=args.tiny)
        plain_figures = plain_sd(sd_dir, device, dtype, shape)
        _free()
        report: dict[str, Any] = {
            "device": workload.device_name(device),
            "dtype": str(dtype),
            "torch": torch.__version__,
            "shape": shape,
            "txt2img": {"plain diffusers": plain_figures},
        }
        save(report, args.out)
        plain = report["txt2img"]["plain diffusers"]
        variants: dict[str, tuple[SpeedConfig, dict[str, Any]]] = {
            name: (speed, {}) for name, speed in sd_variants(args.tiny, [2, 16], shape["side"]).items()
        }
        # No CFG: one UNet row per image, so its buckets are 1 and 8 rows.
        variants[FEW_STEP] = (sd_variants(args.tiny, [1, 8], shape["side"])["all (defaults)"], FEW_STEP_REQUEST)
        for name, (speed, fields) in variants.items():
            if args.only and not any(word in name for word in args.only):
                continue
            model = ModelSpec(source=str(sd_dir))
            if fields:
                unet = json.loads((sd_dir / "unet" / "config.json").read_text())
                model = replace(model, lora=str(make_lora(unet, work / "lora")), **fields)
            settings = Settings(
                engine=EngineConfig(default_model="sd", offline=True, vae_batch=8, speed=speed),
                models={"sd": model},
            )
            result = engine_sd(settings, shape, fields)
            _free()
            for n in (1, 8):
                result[f"{n} images"]["ratio vs plain"] = round(
                    plain[f"{n} images"]["seconds"] / result[f"{n} images"]["seconds"], 2
                )
            report["txt2img"][name] = result
            print(f"{name}: {result}", file=sys.stderr, flush=True)
            save(report, args.out)
        if not args.no_upscale:
            sides = [32, 64] if args.tiny else [128, 512]
            report["upscale"] = upscale(x4_dir, device, dtype, sides, args.tiny)
        emit(report, args.out)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
