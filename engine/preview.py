"""Cheap previews of images still being denoised: a linear map from latents to RGB, no VAE pass.

`latents_to_rgb` is the small projection, queued on the latents' device in the denoising loop
with an asynchronous copy to the CPU, so the loop never waits for the GPU; `rgb_png` waits for
that copy and encodes the PNG, which the engine leaves to its finisher thread.
"""

from __future__ import annotations

import functools
import io
from dataclasses import dataclass

import torch
from PIL import Image

# Approximate least-squares map from the four Stable Diffusion 1.x/2.x latent channels to RGB
# in [-1, 1]. Good enough to watch a picture form; the exact colours come from the VAE at the end.
_LATENT_RGB = torch.tensor(
    [
        [0.298, 0.207, 0.208],
        [0.187, 0.286, 0.173],
        [-0.158, 0.189, 0.264],
        [-0.184, -0.271, -0.473],
    ]
)

PREVIEW_SIDE = 256
"""Longest side of a preview image, in pixels."""


@dataclass(frozen=True)
class Pixels:
    """(n, h, w, 3) uint8 RGB on the CPU, complete once `ready` (a CUDA event, None on a CPU) has passed."""

    rgb: torch.Tensor
    ready: torch.cuda.Event | None = None

    def wait(self) -> torch.Tensor:
        """The pixels, after the copy from the GPU has finished."""
        if self.ready is not None:
            self.ready.synchronize()
        return self.rgb


def latents_to_rgb(latents: torch.Tensor) -> Pixels:
    """Map (n, 4, h, w) latents to uint8 RGB; on a GPU the copy to the CPU is queued, not awaited."""
    rgb = torch.einsum("nchw,cr->nhwr", latents.float(), _weights(latents.device))
    rgb = ((rgb + 1) * 127.5).clamp(0, 255).to(torch.uint8)
    if rgb.device.type != "cuda":
        return Pixels(rgb)
    host = torch.empty(rgb.shape, dtype=torch.uint8, pin_memory=True)
    host.copy_(rgb, non_blocking=True)
    # On the copy's own stream (that of the latents' device, not necessarily the current device); a
    # blocking event lets the waiting thread sleep instead of spinning on the CPU.
    ready = torch.cuda.Event(blocking=True)  # type: ignore[no-untyped-call]
    ready.record(torch.cuda.current_stream(rgb.device))
    return Pixels(host, ready)


@functools.cache
def _weights(device: torch.device) -> torch.Tensor:
    """The projection on `device`, copied there once (a copy from pageable memory waits for the GPU)."""
    return _LATENT_RGB.to(device)


def preview_png(latents: torch.Tensor, side: int = PREVIEW_SIDE) -> bytes:
    """A small PNG of a request's latents: one image, or the images side by side in a grid."""
    return rgb_png(latents_to_rgb(latents), side)


def rgb_png(pixels: Pixels, side: int = PREVIEW_SIDE) -> bytes:
    """The preview PNG of `latents_to_rgb` output: the half of `preview_png` that can run off the GPU loop."""
    frames = [Image.fromarray(a.numpy()) for a in pixels.wait()]
    sheet = grid(frames)
    scale = side / max(sheet.size)
    sheet = sheet.resize((max(1, round(sheet.width * scale)), max(1, round(sheet.height * scale))))
    buffer = io.BytesIO()
    sheet.save(buffer, format="PNG", compress_level=1)
    return buffer.getvalue()


def grid(images: list[Image.Image]) -> Image.Image:
    """Images of one size laid out as 1x1, 2x1 or 2x2."""
    if len(images) == 1:
        return images[0]
    cols = 2
    rows = (len(images) + 1) // 2
    width, height = images[0].size
    sheet = Image.new("RGB", (cols * width, rows * height), "white")
    for index, image in enumerate(images):
        sheet.paste(image, ((index % cols) * width, (index // cols) * height))
    return sheet
