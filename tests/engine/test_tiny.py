"""Tests for engine.tiny: the random-weight model set that tests and offline demos run on."""

from __future__ import annotations

import pathlib
import shutil
import socket
import time
from typing import Any

import pytest
import torch
from diffusers import (
    StableDiffusionInpaintPipeline,
    StableDiffusionPipeline,
    StableDiffusionUpscalePipeline,
)
from diffusers.models.attention_processor import AttnProcessor2_0
from PIL import Image
from transformers import CLIPTokenizer

from engine.tiny import MARKER, VERSION, make_tiny

_PIPELINES = ("txt2img", "inpaint", "upscaler")


@pytest.fixture(autouse=True)
def offline(monkeypatch: pytest.MonkeyPatch) -> None:
    """Run every test with the hub switched off and any network connection refused."""
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError(f"network access attempted: {args}")

    monkeypatch.setattr(socket.socket, "connect", refuse)
    monkeypatch.setattr(socket, "create_connection", refuse)


@pytest.fixture
def tiny_set(tmp_path: pathlib.Path) -> pathlib.Path:
    return make_tiny(tmp_path / "tiny")


def _files(root: pathlib.Path) -> dict[str, bytes]:
    return {str(p.relative_to(root)): p.read_bytes() for p in sorted(root.rglob("*")) if p.is_file()}


def test_build_is_fast_complete_and_atomic(tmp_path: pathlib.Path) -> None:
    """make_tiny writes all three pipelines, the README and the marker in well under 30 s,
    returns the directory, and leaves no staging folder beside it."""
    started = time.perf_counter()
    result = make_tiny(tmp_path / "tiny")
    elapsed = time.perf_counter() - started

    assert elapsed < 15, f"build took {elapsed:.1f} s"
    assert result == tmp_path / "tiny"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["tiny"]
    for name in _PIPELINES:
        assert (result / name / "model_index.json").is_file()
    assert "random" in (result / "README.txt").read_text().lower()
    assert (result / MARKER).read_text().strip() == str(VERSION)


def test_txt2img_generates_at_requested_size(tiny_set: pathlib.Path) -> None:
    """The stock StableDiffusionPipeline loads the txt2img folder (with its safety checker) and
    makes 64x64, 96x64 and 128x128 images in 2 steps."""
    pipe = StableDiffusionPipeline.from_pretrained(tiny_set / "txt2img", use_safetensors=True)
    assert pipe.safety_checker is not None
    assert pipe.vae_scale_factor == 8
    for width, height in ((64, 64), (96, 64), (128, 128)):
        out = pipe("a red fox", width=width, height=height, num_inference_steps=2)
        assert out.images[0].size == (width, height)
        assert out.nsfw_content_detected == [False]


def test_inpaint_uses_nine_channel_unet(tiny_set: pathlib.Path) -> None:
    """The inpaint folder is a dedicated 9-channel inpainting model that fills a 64x64 mask."""
    pipe = StableDiffusionInpaintPipeline.from_pretrained(tiny_set / "inpaint", use_safetensors=True)
    assert pipe.unet.config.in_channels == 9
    image = Image.new("RGB", (64, 64), "red")
    mask = Image.new("L", (64, 64), 255)
    out = pipe(
        "a fox",
        image=image,
        mask_image=mask,
        height=64,
        width=64,
        num_inference_steps=2,
    )
    assert out.images[0].size == (64, 64)


def test_upscaler_upscales_four_times(tiny_set: pathlib.Path) -> None:
    """The stock StableDiffusionUpscalePipeline turns 32x32 into 128x128 and 48x32 into 192x128."""
    pipe = StableDiffusionUpscalePipeline.from_pretrained(tiny_set / "upscaler", use_safetensors=True)
    assert pipe.vae.config.scaling_factor == 0.08333
    assert pipe.config.max_noise_level == 350
    for width, height in ((32, 32), (48, 32)):
        low_res = Image.new("RGB", (width, height), "blue")
        out = pipe("a fox", image=low_res, num_inference_steps=2)
        assert out.images[0].size == (4 * width, 4 * height)


def test_upscaler_attends_to_the_prompt_only(tiny_set: pathlib.Path) -> None:
    """No attention layer of the upscaler's UNet or VAE attends over the image (whose latents have its size,
    so such a layer's cost would grow with the square of the pixels): every one it runs attends to the prompt."""
    pipe = StableDiffusionUpscalePipeline.from_pretrained(tiny_set / "upscaler", use_safetensors=True)
    attended: list[str] = []

    class Recording(AttnProcessor2_0):
        def __call__(
            self,
            attn: Any,
            hidden_states: torch.Tensor,
            encoder_hidden_states: torch.Tensor | None = None,
            attention_mask: torch.Tensor | None = None,
            temb: torch.Tensor | None = None,
        ) -> torch.Tensor:
            attended.append("image" if encoder_hidden_states is None else "prompt")
            return super().__call__(attn, hidden_states, encoder_hidden_states, attention_mask, temb)

    pipe.unet.set_attn_processor(Recording())
    if pipe.vae.attn_processors:
        pipe.vae.set_attn_processor(Recording())
    pipe("a fox", image=Image.new("RGB", (48, 32), "blue"), num_inference_steps=2)

    assert "prompt" in attended
    assert "image" not in attended


def test_tokenizer_covers_any_text(tiny_set: pathlib.Path, tmp_path: pathlib.Path) -> None:
    """The generated byte-level vocabulary encodes accents and emoji without unknown tokens,
    pads to 77, every id fits the text encoder's embedding table, and vocab.json + merges.txt
    alone load to the same tokenizer as tokenizer.json."""
    folder = tiny_set / "txt2img" / "tokenizer"
    tokenizer = CLIPTokenizer.from_pretrained(folder)
    classic = tmp_path / "classic"
    classic.mkdir()
    for name in ("vocab.json", "merges.txt"):
        shutil.copyfile(folder / name, classic / name)
    text = "a red fox, ünïcode 🦊"
    ids = tokenizer(text, padding="max_length", max_length=tokenizer.model_max_length).input_ids
    body = tokenizer(text).input_ids[1:-1]

    assert len(ids) == 77
    assert tokenizer.unk_token_id not in body
    assert tokenizer.decode(body) == "a red fox , ünïcode 🦊"
    assert CLIPTokenizer.from_pretrained(classic)(text).input_ids == tokenizer(text).input_ids
    pipe = StableDiffusionPipeline.from_pretrained(tiny_set / "txt2img", use_safetensors=True)
    assert max(ids) < pipe.text_encoder.config.vocab_size


def test_writes_safetensors_only(tiny_set: pathlib.Path) -> None:
    """No pickle-based weight file (.bin, .pt, .pth, .ckpt, .pkl) is written."""
    pickles = [p for p in tiny_set.rglob("*") if p.suffix in {".bin", ".pt", ".pth", ".ckpt", ".pkl"}]
    assert pickles == []
    model_dirs = {p.parent for p in tiny_set.rglob("config.json")}  # unet, vae, text_encoder, ...
    assert len(model_dirs) == 11
    assert all(len(list(d.glob("*.safetensors"))) == 1 for d in model_dirs)


def test_second_call_is_a_no_op(tiny_set: pathlib.Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A complete set of the current version is returned as is, without touching a file."""
    before = {p: p.stat().st_mtime_ns for p in tiny_set.rglob("*")}
    monkeypatch.setattr("engine.tiny._build", pytest.fail)

    assert make_tiny(tiny_set) == tiny_set
    assert {p: p.stat().st_mtime_ns for p in tiny_set.rglob("*")} == before


def test_builds_are_deterministic(tmp_path: pathlib.Path) -> None:
    """Two builds write byte-identical files and leave the caller's torch RNG untouched."""
    torch.manual_seed(123)
    expected_draw = torch.rand(3)
    torch.manual_seed(123)
    first = make_tiny(tmp_path / "a")
    second = make_tiny(tmp_path / "b")

    assert torch.equal(torch.rand(3), expected_draw)
    assert _files(first) == _files(second)
