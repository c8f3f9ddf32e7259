"""PNG encoding of results: Pillow's encoder against engine/images.py's banded one, on this machine's CPU.

    python bench/png.py                     # 512x512 and 2048x2048, 1 to 8 threads, best of 5
    python bench/png.py --out bench/results/png-<cpu>.json

PNG encoding is CPU work in the engine's finishing half (a 2048x2048 upscale spent 0.93 s of its
6.5 s in one Pillow encode on an H200 box), so this needs no GPU; it is timed on whatever CPU runs
it, which is the point: run it on the GPU box for that box's figure. The test image looks like a
generated one (smooth structure, a little fine noise), not random noise, which would not compress.
Each figure is the fastest of `--repeat` runs; the file sizes show what each costs in bytes.
"""

from __future__ import annotations

import argparse
import io
import os
import platform
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

import numpy as np
from PIL import Image

from bench.report import emit
from engine.images import PARALLEL_PNG_PIXELS, encode_png

PARAMETERS = {"prompt": "a lighthouse at dusk, detailed photo", "seed": 1, "steps": 30, "model": "sd15"}


def photo_like(side: int, seed: int = 0) -> Image.Image:
    """Smooth colour structure (bicubic-upsampled noise) with slight fine noise, like a generated image."""
    rng = np.random.default_rng(seed)
    coarse = Image.fromarray(rng.integers(0, 256, (side // 32, side // 32, 3), dtype=np.uint8))
    smooth = np.asarray(coarse.resize((side, side), Image.Resampling.BICUBIC)).astype(np.int16)
    grain = rng.integers(-3, 4, smooth.shape, dtype=np.int16)
    return Image.fromarray(np.clip(smooth + grain, 0, 255).astype(np.uint8))


def pillow_png(image: Image.Image) -> bytes:
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", compress_level=4)
    return buffer.getvalue()


def fastest(encode: Any, repeat: int) -> tuple[float, int]:
    """The fastest of `repeat` runs of `encode()`, in seconds, and the size of what it wrote."""
    times, size = [], 0
    for _ in range(repeat):
        started = time.perf_counter()
        size = len(encode())
        times.append(time.perf_counter() - started)
    return round(min(times), 4), size


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--sides", default="512,2048", help="square image sides to time (512,2048)")
    parser.add_argument("--threads", default="1,2,4,8", help="band threads to time the banded encoder with")
    parser.add_argument("--repeat", type=int, default=5, help="runs per figure; the fastest is kept (5)")
    parser.add_argument("--out", type=Path, help="also write the JSON report here")
    args = parser.parse_args()
    report: dict[str, Any] = {
        "cpu": platform.processor() or platform.machine(),
        "cores": os.cpu_count(),
        "banded from pixels": PARALLEL_PNG_PIXELS,
        "sizes": {},
    }
    for side in (int(value) for value in args.sides.split(",")):
        image = photo_like(side)
        pillow_seconds, pillow_bytes = fastest(lambda image=image: pillow_png(image), args.repeat)
        figures: dict[str, Any] = {"pillow level 4": {"seconds": pillow_seconds, "bytes": pillow_bytes}}
        if side * side >= PARALLEL_PNG_PIXELS:
            for threads in (int(value) for value in args.threads.split(",")):

                def banded(image: Image.Image = image, threads: int = threads) -> bytes:
                    return encode_png(image, parameters=PARAMETERS, threads=threads)

                seconds, size = fastest(banded, args.repeat)
                figures[f"banded, {threads} threads"] = {
                    "seconds": seconds,
                    "bytes": size,
                    "x pillow": round(pillow_seconds / seconds, 2),
                }
        else:
            figures["encode_png (Pillow below the banded size)"] = dict(
                zip(("seconds", "bytes"), fastest(lambda image=image: encode_png(image), args.repeat), strict=True)
            )
        report["sizes"][f"{side}x{side}"] = figures
    emit(report, args.out)


if __name__ == "__main__":
    main()
