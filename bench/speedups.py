"""What each speed-up buys: plain diffusers beside the engine with each `[engine.speed]` choice, one run.

    PYTHONUNBUFFERED=1 python bench/speedups.py --out bench/results/speedups-h100.json
    PYTHONUNBUFFERED=1 python bench/speedups.py --only all --no-upscale --out bench/results/speedups-all-h100.json
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
start-up cost is reported as `warmup_seconds`. Ratios are plain seconds / engine seconds. `--only`
takes the exact row names of `ROWS` (none, tf32, channels_last, fuse_qkv, compile_default,
compile_reduce_overhead, all, few_step). The engine is built as the engine process builds it
(`finish_async`: previews and PNGs are encoded on the finisher thread, and each figure runs to the
last PNG). Rows share one process but not state: TF32 is put back as it was after each row, and
compiled modules (with their CUDA-graph pools) and every tensor are freed (`torch._dynamo.reset()`,
garbage collection, `empty_cache`); each row reports the TF32 setting and allocated memory it
started from.
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
from collections.abc import Callable, Iterator
from contextlib import contextmanager
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

FEW_STEP = "few_step"
FEW_STEP_REQUEST = {"scheduler": "lcm", "steps": 4, "guidance": 1.0}

ROWS = {
    "none": "no speed-up",
    "tf32": "TF32 matmuls alone",
    "channels_last": "channels-last UNet alone",
    "fuse_qkv": "fused QKV projections alone",
    "compile_default": "torch.compile (mode default) alone, buckets of 2 and 16 rows",
    "compile_reduce_overhead": "torch.compile with CUDA graphs (reduce-overhead) alone, buckets of 2 and 16 rows",
    "all": "all defaults: compiled with CUDA graphs, channels-last, fused QKV, TF32",
    FEW_STEP: "few-step model: a LoRA fused, lcm, 4 steps, guidance 1, all defaults, buckets of 1 and 8 rows",
}
"""The txt2img rows, by the exact name `--only` selects them with."""


def sd_variants(tiny: bool, rows: list[int], side: int) -> dict[str, SpeedConfig]:
    """The txt2img configurations compared (compiled ones only for the shapes timed)."""
    backend = {"compile_backend": "eager"} if tiny else {}
    buckets: dict[str, Any] = {"sizes": [[side, side]], "batches": rows, **backend}
    return {
        "none": NONE,
        "tf32": replace(NONE, tf32=True),
        "channels_last": replace(NONE, channels_last=True),
        "fuse_qkv": replace(NONE, fuse_qkv=True),
        "compile_default": replace(NONE, compile=True, compile_mode="default", **buckets),
        "compile_reduce_overhead": replace(NONE, compile=True, **buckets),
        "all": SpeedConfig(compile=True, channels_last=True, fuse_qkv=True, **buckets),
    }


def selected(only: list[str] | None) -> list[str]:
    """The rows to run, in table order: exactly the names given (an unknown name is an error listing the known)."""
    if not only:
        return list(ROWS)
    unknown = [name for name in only if name not in ROWS]
    if unknown:
        raise SystemExit(f"unknown row {', '.join(unknown)}: choose from {', '.join(ROWS)}")
    return [name for name in ROWS if name in only]


def _measure(device: torch.device, repeat: int, work: Callable[[], object]) -> dict[str, Any]:
    """Median seconds of `repeat` runs after one warm-up, and the GPU memory of the timed runs (peaks reset
    after the warm-up, so a compile's or graph capture's own memory is left out; a recorded CUDA graph's pool
    shows in `peak_reserved_gib`)."""
    work()
    times = []
    workload.reset_peak(device)
    for _ in range(repeat):
        workload.sync(device)
        started = time.perf_counter()
        work()
        workload.sync(device)
        times.append(time.perf_counter() - started)
    return {"seconds": round(statistics.median(times), 4), **workload.memory(device)}


def _free() -> None:
    """Give back what the last row held: compiled modules (dynamo keeps them, and their CUDA-graph pools, alive
    until reset), then every unreferenced tensor and the allocator's cache."""
    if "torch._dynamo" in sys.modules:
        torch._dynamo.reset()
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


@contextmanager
def row_state() -> Iterator[dict[str, Any]]:
    """One row's global state: TF32 as it was before it (the engine's `tf32` choice sets it process-wide and never
    unsets it), and its memory freed after it. Yields what the row starts from, for the report."""
    matmul, cudnn = torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32
    start: dict[str, Any] = {"tf32 at start": matmul}
    if torch.cuda.is_available():
        start["allocated_gib at start"] = round(torch.cuda.memory_allocated() / workload.GIB, 3)
    try:
        yield start
    finally:
        torch.backends.cuda.matmul.allow_tf32, torch.backends.cudnn.allow_tf32 = matmul, cudnn
        _free()


def plain_sd(model_dir: Path, device: torch.device, dtype: torch.dtype, shape: dict[str, int]) -> dict[str, Any]:
    """Stock StableDiffusionPipeline, one prompt per call and 8 per call, to PNG bytes."""
    pipe = StableDiffusionPipeline.from_pretrained(model_dir, torch_dtype=dtype, safety_checker=None).to(device)
    pipe.scheduler = DPMSolverMultistepScheduler.from_config(pipe.scheduler.config, algorithm_type="dpmsolver++")
    pipe.set_progress_bar_config(disable=True)

    def call(n: int) -> None:
        gens = [torch.Generator("cpu").manual_seed(k) for k in range(n)]
        images = pipe(
            [workload.prompt(k) for k in range(n)],
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
    (compile) cost. Built as the engine process builds it (`finish_async`: previews and PNGs are encoded on the
    finisher thread, off the GPU loop); each figure is timed to the last PNG (`_run` drains)."""
    started = time.perf_counter()
    engine = Engine(settings, finish_async=True)
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
    engine.close()
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
        with row_state():
            out |= _upscale_row(name, extra, x4_dir, device, sides, steps=steps, repeat=repeat)
    return out


def _upscale_row(
    name: str, extra: dict[str, Any], x4_dir: Path, device: torch.device, sides: list[int], *, steps: int, repeat: int
) -> dict[str, Any]:
    """One of the engine's upscaler choices at each input side (the engine freed after it)."""
    out: dict[str, Any] = {}
    config = EngineConfig(default_upscaler="x4", offline=True, **extra)
    models = {"x4": ModelSpec(source=str(x4_dir), kind=ModelKind.UPSCALER)}
    engine = Engine(Settings(engine=config, models=models), finish_async=True)
    try:
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
    finally:
        engine.close()
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
    parser.add_argument(
        "--only", action="append", help="run only this txt2img row (repeatable, exact name): " + ", ".join(ROWS)
    )
    parser.add_argument("--no-upscale", action="store_true", help="skip the upscaler comparison")
    parser.add_argument("--repeat", type=int, default=3, help="timed runs per figure (median reported)")
    parser.add_argument("--models", type=Path, help=MODELS_HELP)
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    args = parser.parse_args()
    rows = selected(args.only)
    device, dtype = workload.device()
    shape = {"side": 64, "steps": 3, "repeat": 1} if args.tiny else {"side": 512, "steps": 30, "repeat": args.repeat}
    work = Path(tempfile.mkdtemp(prefix="easelbot-speedups-"))
    try:
        sd_dir, x4_dir = build_models(args.models or work, tiny=args.tiny)
        with row_state() as start:
            plain_figures = {**start, **plain_sd(sd_dir, device, dtype, shape)}
        report: dict[str, Any] = {
            "device": workload.device_name(device),
            "dtype": str(dtype),
            "torch": torch.__version__,
            "shape": shape,
            "rows": {name: ROWS[name] for name in rows},
            "previews": "as the engine process makes them: every 5 steps, encoded on the finisher thread "
            "(finish_async), so they never wait on the GPU loop; plain diffusers makes none",
            "txt2img": {"plain diffusers": plain_figures},
        }
        save(report, args.out)
        plain = report["txt2img"]["plain diffusers"]
        variants: dict[str, tuple[SpeedConfig, dict[str, Any]]] = {
            name: (speed, {}) for name, speed in sd_variants(args.tiny, [2, 16], shape["side"]).items()
        }
        # No CFG: one UNet row per image, so its buckets are 1 and 8 rows.
        variants[FEW_STEP] = (sd_variants(args.tiny, [1, 8], shape["side"])["all"], FEW_STEP_REQUEST)
        for name in rows:
            speed, fields = variants[name]
            model = ModelSpec(source=str(sd_dir))
            if fields:
                unet = json.loads((sd_dir / "unet" / "config.json").read_text())
                model = replace(model, lora=str(make_lora(unet, work / "lora")), **fields)
            settings = Settings(
                engine=EngineConfig(default_model="sd", offline=True, vae_batch=8, speed=speed),
                models={"sd": model},
            )
            with row_state() as start:
                result = {**start, **engine_sd(settings, shape, fields)}
            for n in (1, 8):
                result[f"{n} images"]["ratio vs plain"] = round(
                    plain[f"{n} images"]["seconds"] / result[f"{n} images"]["seconds"], 2
                )
            report["txt2img"][name] = result
            print(f"{name}: {result}", file=sys.stderr, flush=True)
            save(report, args.out)
        if not args.no_upscale:
            sides = [32, 64] if args.tiny else [128, 512]
            with row_state():
                report["upscale"] = upscale(x4_dir, device, dtype, sides, args.tiny)
        emit(report, args.out)
    finally:
        shutil.rmtree(work, ignore_errors=True)


if __name__ == "__main__":
    main()
