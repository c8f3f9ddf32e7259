"""Cheap previews of images still being denoised: a linear map from latents to RGB, no VAE pass.

`latents_to_rgb` is the small projection (it moves the result to the CPU, so it runs in the
denoising loop); `rgb_png` is the PNG encoding, which the engine leaves to its finisher thread.
"""

from __future__ import annotations

import io

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


def latents_to_rgb(latents: torch.Tensor) -> torch.Tensor:
    """Map (n, 4, h, w) latents to (n, h, w, 3) uint8 RGB on the CPU."""
    rgb = torch.einsum("nchw,cr->nhwr", latents.float().cpu(), _LATENT_RGB)
    return ((rgb + 1) * 127.5).clamp(0, 255).to(torch.uint8)


def preview_png(latents: torch.Tensor, side: int = PREVIEW_SIDE) -> bytes:
    """A small PNG of a request's latents: one image, or the images side by side in a grid."""
    return rgb_png(latents_to_rgb(latents), side)


def rgb_png(rgb: torch.Tensor, side: int = PREVIEW_SIDE) -> bytes:
    """The preview PNG of `latents_to_rgb` output: the half of `preview_png` that can run off the GPU loop."""
    frames = [Image.fromarray(a.numpy()) for a in rgb]
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
