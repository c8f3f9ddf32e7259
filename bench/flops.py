"""Compute floors: the floating-point work of each target's job, counted, and the least time it could take.

    python bench/flops.py                 # full-size architectures, default tiling, H100/H200 dense fp16 peak
    python bench/flops.py --peak 165      # another GPU's dense fp16 tensor TFLOP/s
    python bench/flops.py --out bench/results/flops.json

Builds the full-size SD1.5 and x4-upscaler architectures (bench/smoke.py's) on PyTorch's meta device, so
nothing is allocated or computed and it takes seconds on any CPU, and counts the FLOPs of their matmuls,
convolutions and attention with `torch.utils.flop_counter`: one guided UNet step (negative and positive
rows), one VAE decode, one text-encoder call, for the shapes the engine runs, with the upscaler's UNet and
VAE tiled as `[engine]`'s defaults tile them (engine/upscale.py's `tile_starts`). Dividing by the GPU's
peak gives a floor no engine can beat; a measured time over its floor says how much of the peak a task
used. Counts, not timings: the GPU figures they are compared with are in docs/performance.md.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import torch
from diffusers.utils import logging as diffusers_logging
from torch.utils.flop_counter import FlopCounterMode

from bench.report import emit
from bench.smoke import _sd15_unet, _text_encoder, _upscaler_unet, _vae
from engine.config import EngineConfig
from engine.upscale import tile_starts

H100_DENSE_FP16_TFLOPS = 989.0
"""NVIDIA's datasheet figure for H100 SXM and H200 dense FP16/BF16 tensor throughput (without sparsity)."""

META = torch.device("meta")
HALF = torch.float16
SD_STEPS = 30
UPSCALE_STEPS = 20


def tflop(run: Callable[[], Any]) -> float:
    """The TFLOPs `run` does (counted on meta tensors: nothing is computed)."""
    counter = FlopCounterMode(display=False)
    with counter, torch.no_grad():
        run()
    return counter.get_total_flops() / 1e12


def _tiles(side: int, tile: int, overlap: int) -> list[int]:
    """The tile sides covering a square latent of `side` (one per tile)."""
    count = len(tile_starts(side, tile, overlap)) ** 2
    return [min(side, tile)] * count


def sd_figures() -> dict[str, float]:
    """SD1.5 at 512x512: a guided UNet step per image, the VAE decode per image, the text encoder per prompt pair."""
    with META:
        unet = _sd15_unet().to(HALF)
        vae = _vae(4, 0.18215).to(HALF)
        text = _text_encoder(768, 12, 12, "quick_gelu", 768).to(HALF)
    latents = torch.empty((2, 4, 64, 64), device=META, dtype=HALF)
    embeds = torch.empty((2, 77, 768), device=META, dtype=HALF)
    timestep = torch.zeros((2,), device=META, dtype=torch.long)
    tokens = torch.zeros((2, 77), device=META, dtype=torch.long)
    step = tflop(lambda: unet(latents, timestep, encoder_hidden_states=embeds))
    decode = tflop(lambda: vae.decode(latents[:1]))
    encode = tflop(lambda: text(tokens))
    return {
        "unet step, guided (2 rows)": step,
        "vae decode 512x512": decode,
        "text encoder (2 prompts)": encode,
        "one image (30 guided steps, decode, text)": SD_STEPS * step + decode + encode,
    }


def upscale_figures(side: int, engine: EngineConfig) -> dict[str, Any]:
    """One x4 upscale of a `side`-pixel square input, tiled as the engine tiles it."""
    with META:
        unet = _upscaler_unet().to(HALF)
        vae = _vae(3, 0.08333).to(HALF)
        text = _text_encoder(1024, 23, 16, "gelu", 512).to(HALF)

    def step(tile: int) -> float:
        latents = torch.empty((2, 7, tile, tile), device=META, dtype=HALF)
        embeds = torch.empty((2, 77, 1024), device=META, dtype=HALF)
        timestep = torch.zeros((2,), device=META, dtype=torch.long)
        noise_level = torch.zeros((2,), device=META, dtype=torch.long)
        return tflop(lambda: unet(latents, timestep, encoder_hidden_states=embeds, class_labels=noise_level))

    def decode(tile: int) -> float:
        return tflop(lambda: vae.decode(torch.empty((1, 4, tile, tile), device=META, dtype=HALF)))

    tokens = torch.zeros((2, 77), device=META, dtype=torch.long)
    unet_tiles = _tiles(side, engine.upscale_tile, engine.upscale_tile_overlap)
    vae_tiles = _tiles(side, engine.upscale_vae_tile, engine.upscale_tile_overlap)
    unet_total = UPSCALE_STEPS * sum(step(tile) for tile in unet_tiles)
    vae_total = sum(decode(tile) for tile in vae_tiles)
    untiled_decode = decode(side) if len(vae_tiles) > 1 else vae_total
    encode = tflop(lambda: text(tokens))
    return {
        "unet tiles": f"{len(unet_tiles)} of {unet_tiles[0]}",
        "vae tiles": f"{len(vae_tiles)} of {vae_tiles[0]}",
        "unet (20 guided steps)": unet_total,
        "vae decode": vae_total,
        "vae decode untiled": untiled_decode,
        "text encoder (2 prompts)": encode,
        "whole upscale": unet_total + vae_total + encode,
    }


def report(peak: float, engine: EngineConfig) -> dict[str, Any]:
    sd = sd_figures()
    image = sd["one image (30 guided steps, decode, text)"]
    upscales = {f"{side}->{side * 4}": upscale_figures(side, engine) for side in (128, 512)}
    floors: dict[str, float] = {
        "txt2img 512x512, one image": image / peak,
        "burst images/s at most": peak / image,
    }
    for name, figures in upscales.items():
        floors[f"upscale {name}"] = figures["whole upscale"] / peak
    return {
        "what": "TFLOPs counted on the meta device (full-size architectures, float16); least seconds at the peak",
        "peak tflops": peak,
        "tiling": {
            "upscale_tile": engine.upscale_tile,
            "upscale_vae_tile": engine.upscale_vae_tile,
            "upscale_tile_overlap": engine.upscale_tile_overlap,
        },
        "sd15 tflop": _rounded(sd),
        "upscale tflop": {name: _rounded(figures) for name, figures in upscales.items()},
        "floor seconds at the peak": _rounded(floors),
    }


def _rounded(figures: dict[str, Any]) -> dict[str, Any]:
    return {name: round(value, 4) if isinstance(value, float) else value for name, value in figures.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument(
        "--peak", type=float, default=H100_DENSE_FP16_TFLOPS, help="the GPU's dense fp16 TFLOP/s (default: H100/H200)"
    )
    parser.add_argument("--out", type=Path, help="also write the JSON here")
    args = parser.parse_args()
    diffusers_logging.set_verbosity_error()  # casting meta modules with .to() warns about float32 modules
    emit(report(args.peak, EngineConfig()), args.out)


if __name__ == "__main__":
    main()
