"""Every speed-up gives the same images as the plain path (on the tiny model, CPU).

Timings are measured on a GPU by bench/ (docs/performance.md); here we only prove that each
optimisation is safe to switch on: same pixels within float rounding, compiled buckets padded
and never recompiled, uncompiled shapes run at once, a broken compiler never stops the engine.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import msgspec
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL
from torch.utils._python_dispatch import TorchDispatchMode

from engine.config import SpeedConfig
from engine.engine import Engine
from engine.protocol import Request, Task
from engine.speed import Choices, Denoiser, decode_guarded, to_pil
from engine.worker import close, real_engine
from tests.engine.support import assert_near, done_arrays, request, run, tiny_settings

TOLERANCE = 2
"""A different memory layout or fused matmul rounds differently: allow 2/255."""


class _CountingBackend:
    """A torch.compile backend that counts compilations and runs the traced graph as is."""

    def __init__(self) -> None:
        self.graphs = 0
        self.fail = False

    def __call__(self, graph: torch.fx.GraphModule, example_inputs: list[torch.Tensor]) -> Callable[..., Any]:
        if self.fail:
            raise RuntimeError("the compiler is broken today")
        self.graphs += 1
        return graph.forward


_BACKEND = _CountingBackend()
torch._dynamo.register_backend(_BACKEND, name="easel-counting")


@pytest.fixture
def backend() -> Iterator[_CountingBackend]:
    """The counting backend, with dynamo's caches emptied (a UNet of the same architecture would reuse them)."""
    torch._dynamo.reset()
    _BACKEND.graphs = 0
    _BACKEND.fail = False
    yield _BACKEND
    _BACKEND.fail = False


def _engine(tiny_root: Path, **speed: Any) -> Engine:
    return Engine(tiny_settings(tiny_root, speed=SpeedConfig(**speed)))


def _same(plain: Engine, fast: Engine, *requests: Request) -> None:
    """Each request's images from `fast` match `plain`'s within TOLERANCE, and are not flat."""
    expected = run(plain, *requests)
    got = run(fast, *requests)
    for req in requests:
        for a, b in zip(done_arrays(got, req.job_id), done_arrays(expected, req.job_id), strict=True):
            assert_near(a, b, TOLERANCE)
            assert a.std() > 1


def test_auto_means_on_for_a_cuda_gpu_and_off_on_a_cpu() -> None:
    """`auto` switches layout, fusion and compilation on only for CUDA; attention slicing rules out fusion."""
    config = SpeedConfig()
    assert Choices.resolve(config, torch.device("cpu")) == Choices(False, False, False, False)
    assert Choices.resolve(config, torch.device("cuda")) == Choices(True, True, True, False)
    sliced = Choices.resolve(SpeedConfig(attention_slicing=True, fuse_qkv=True), torch.device("cuda"))
    assert sliced.attention_slicing
    assert not sliced.fuse_qkv


def test_an_uncompiled_unet_gets_auto_layout_and_fusion_off_and_explicit_ones_on() -> None:
    """Uncompiled, channels-last and fused projections each made the UNet slower on an H200: `auto` leaves them
    off for a UNet that is not compiled (the inpaint UNet, models loaded while serving, no buckets); a config
    that asks for them explicitly still gets them."""
    cuda = Choices.resolve(SpeedConfig(), torch.device("cuda"))
    assert cuda.uncompiled(SpeedConfig()) == Choices(False, False, False, False)
    forced = SpeedConfig(channels_last=True, fuse_qkv=True)
    assert Choices.resolve(forced, torch.device("cuda")).uncompiled(forced) == Choices(True, True, False, False)


@pytest.mark.parametrize("compiled", [True, False], ids=["compiled", "uncompiled"])
def test_build_tunes_a_unet_by_whether_it_is_compiled(compiled: bool, tiny_root: Path) -> None:
    """`auto` layout and fusion as a CUDA GPU resolves them: applied to a UNet with buckets, not to one without."""
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(tiny_root / "txt2img" / "unet")
    config = SpeedConfig(compile_backend="eager", sizes=[[64, 64]] if compiled else [])
    Denoiser.build(unet, config, Choices(channels_last=True, fuse_qkv=True, compile=True, attention_slicing=False))
    weight = unet.conv_in.weight
    assert weight.is_contiguous(memory_format=torch.channels_last) is compiled
    fused = [module.fused_projections for module in unet.modules() if hasattr(module, "fused_projections")]
    assert fused
    assert set(fused) == {compiled}
    sliced = Choices.resolve(SpeedConfig(attention_slicing=True, fuse_qkv=True), torch.device("cuda"))
    assert sliced.attention_slicing
    assert not sliced.fuse_qkv


@pytest.mark.parametrize(
    "option",
    [{"channels_last": True}, {"fuse_qkv": True}, {"attention_slicing": True}],
    ids=["channels-last", "fused-qkv", "attention-slicing"],
)
def test_layout_and_attention_options_give_the_same_images(
    engine: Engine, tiny_root: Path, option: dict[str, bool]
) -> None:
    """txt2img, inpaint (dedicated UNet) and upscale match the plain engine with each option on."""
    fast = _engine(tiny_root, **option)
    _same(
        engine,
        fast,
        request(job_id="a", count=2, scheduler="dpmpp_2m_karras"),
        request(job_id="b", prompt="a blue car", seed=7, guidance=3.0, scheduler="dpmpp_2m_karras"),
    )
    _same(engine, fast, request(Task.INPAINT, job_id="inpaint", strength=1.0))
    _same(engine, fast, request(Task.UPSCALE, job_id="upscale"))


def test_compiled_buckets_are_padded_and_never_compiled_again(
    engine: Engine, tiny_root: Path, backend: _CountingBackend
) -> None:
    """After start-up, bucketed shapes pad to a compiled size and other shapes run uncompiled, same images."""
    fast = _engine(tiny_root, compile=True, compile_backend="easel-counting", sizes=[[64, 64]], batches=[2, 4])
    model = fast.store.sd("tiny", Task.TXT2IMG)  # loading compiles every bucket
    stats = model.denoiser.stats
    assert stats.buckets == ["64x64*2", "64x64*4"]
    assert backend.graphs > 0
    assert fast.store.speed_summary()["compiled_buckets"] == stats.buckets
    compiled_at_start = backend.graphs

    _same(engine, fast, request(job_id="exact"))  # 2 rows: a bucket
    assert (stats.compiled_calls, stats.eager_calls, stats.padded_rows) == (3, 0, 0)
    _same(engine, fast, request(job_id="unguided", guidance=1.0, scheduler="ddim"))  # 1 row, padded to 2
    assert stats.padded_rows == 3
    _same(engine, fast, request(job_id="a"), request(job_id="b", seed=9, guidance=1.0, scheduler="euler_a"))  # 3 -> 4
    _same(engine, fast, request(job_id="many", count=3))  # 6 rows: more than the largest bucket
    _same(engine, fast, request(job_id="odd-size", width=72, height=64))  # not a compiled size
    assert stats.eager_calls == 6
    _same(engine, fast, request(Task.IMG2IMG, job_id="img2img"))  # shares the txt2img UNet
    assert backend.graphs == compiled_at_start, "a request compiled a new graph after start-up"


def test_the_engine_process_compiles_before_it_reports_ready(tiny_root: Path, backend: _CountingBackend) -> None:
    """With compiling on, the default models load at start-up even when `preload` is empty; Ready names the buckets."""
    speed = SpeedConfig(
        compile=True, compile_backend="easel-counting", sizes=[[64, 64]], batches=[2, 4], upscale_sizes=[[32, 32]]
    )
    runner, ready = real_engine(tiny_settings(tiny_root, speed=speed))
    try:
        assert ready.models == ["tiny", "tiny-x4"]  # the default model and, for its buckets, the default upscaler
        assert ready.compiled == ["64x64*2", "64x64*4", "32x32*2"]
        assert 0 < ready.warmup_seconds <= ready.seconds
        assert backend.graphs > 0
    finally:
        close(runner)


def test_a_default_model_not_downloaded_yet_does_not_stop_the_start(
    tiny_root: Path, backend: _CountingBackend, caplog: pytest.LogCaptureFixture
) -> None:
    """The start-up compile of a default model that cannot load is skipped with a warning; the engine starts."""
    speed = SpeedConfig(compile=True, compile_backend="easel-counting", sizes=[[64, 64]], batches=[2])
    settings = tiny_settings(tiny_root, speed=speed)
    settings = msgspec.structs.replace(settings, engine=msgspec.structs.replace(settings.engine, default_model="sd15"))
    runner, ready = real_engine(settings)
    try:
        assert ready.models == []
        assert ready.compiled == []
        assert "could not be loaded and compiled at start-up" in caplog.text
        assert "easelbot models download" in caplog.text
    finally:
        close(runner)


def test_a_model_first_asked_for_after_start_up_runs_uncompiled(tiny_root: Path, backend: _CountingBackend) -> None:
    """Only start-up compiles: a model loaded later (here `base`) runs plainly at once, with the same images,
    rather than stalling every queued job behind minutes of compiling; the one-shot CLI compiles nothing."""
    fast = _engine(tiny_root, compile=True, compile_backend="easel-counting", sizes=[[64, 64]], batches=[2])
    fast.preload()  # compiles the default model, `tiny`
    compiled_at_start = backend.graphs
    assert compiled_at_start > 0
    model = fast.store.sd("base", Task.TXT2IMG)
    assert model.denoiser.compiled is None
    plain = _engine(tiny_root, compile=False)
    _same(plain, fast, request(job_id="later", model="base", count=2))
    assert backend.graphs == compiled_at_start


def test_a_vae_cast_to_float32_that_runs_out_of_memory_leaves_the_vae_usable(tiny_root: Path) -> None:
    """An out-of-memory error halfway through the float32 redo's cast fails that decode, but the VAE goes back
    to float16 whole, so the next decode works (a half-cast VAE would fail every later job)."""
    vae = AutoencoderKL.from_pretrained(tiny_root / "txt2img", subfolder="vae")
    with torch.no_grad():
        vae.decoder.conv_in.weight.mul_(1e4)  # overflows float16, so the decode is redone in float32
        vae.to(torch.float16)
        latents = 100 * torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(0)).half()
        with pytest.raises(torch.cuda.OutOfMemoryError), _OutOfMemoryOnCast(after=5):
            decode_guarded(vae, latents)
        assert {p.dtype for p in vae.parameters()} == {torch.float16}
        assert torch.isfinite(decode_guarded(vae, latents)).all()


class _OutOfMemoryOnCast(TorchDispatchMode):
    """Raises a CUDA out-of-memory error at the n-th tensor copy to float32 (as a cast on a full GPU would)."""

    def __init__(self, after: int) -> None:
        super().__init__()
        self.left = after

    def __torch_dispatch__(self, func: Any, types: Any, args: Any = (), kwargs: Any = None) -> Any:
        kwargs = kwargs or {}
        if func is torch.ops.aten._to_copy.default and kwargs.get("dtype") == torch.float32:
            self.left -= 1
            if self.left == 0:
                raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 20.00 MiB")
        return func(*args, **kwargs)


def test_the_upscaler_compiles_its_own_sizes(engine: Engine, tiny_root: Path, backend: _CountingBackend) -> None:
    """`upscale_sizes` compiles the upscaler's UNet; an upscale of that size runs compiled with the same image."""
    fast = _engine(tiny_root, compile=True, compile_backend="easel-counting", sizes=[], upscale_sizes=[[32, 32]])
    denoiser = fast.store.upscaler("tiny").denoiser
    assert denoiser.stats.buckets == ["32x32*2"]
    compiled_at_start = backend.graphs
    _same(engine, fast, request(Task.UPSCALE, job_id="upscale"))
    assert denoiser.stats.compiled_calls == 3
    assert backend.graphs == compiled_at_start


def test_a_compiler_failure_at_start_up_leaves_the_engine_serving_uncompiled(
    engine: Engine, tiny_root: Path, backend: _CountingBackend
) -> None:
    """A compile error during warm-up is logged; the UNet runs uncompiled and images are unchanged."""
    backend.fail = True
    fast = _engine(tiny_root, compile=True, compile_backend="easel-counting", sizes=[[64, 64]], batches=[2])
    denoiser = fast.store.sd("tiny", Task.TXT2IMG).denoiser
    assert denoiser.compiled is None
    assert denoiser.stats.buckets == []
    _same(engine, fast, request(job_id="after-failure"))
    assert denoiser.stats.eager_calls == 3


@pytest.mark.parametrize("explicit", [False, True], ids=["auto", "asked-for"])
def test_a_failed_compile_takes_back_the_layout_and_fusion_auto_chose_for_it(
    explicit: bool, tiny_root: Path, backend: _CountingBackend
) -> None:
    """`auto` channels-last and fused projections are for a compiled UNet (uncompiled they were slower): when the
    compile fails they are taken back; asked for explicitly, they stay."""
    from diffusers import UNet2DConditionModel

    unet = UNet2DConditionModel.from_pretrained(tiny_root / "txt2img" / "unet")
    wanted: bool | str = True if explicit else "auto"
    config = SpeedConfig(
        compile_backend="easel-counting", sizes=[[64, 64]], batches=[2], channels_last=wanted, fuse_qkv=wanted
    )
    cuda_like = Choices(channels_last=True, fuse_qkv=True, compile=True, attention_slicing=False)
    denoiser = Denoiser.build(unet, config, cuda_like)
    assert unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
    backend.fail = True
    denoiser.warm_up(unet.config.in_channels, (77, unet.config.cross_attention_dim), lambda rows: {})
    assert denoiser.compiled is None
    assert unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last) is explicit
    fused = {module.fused_projections for module in unet.modules() if hasattr(module, "fused_projections")}
    assert fused == {explicit}
    plain = UNet2DConditionModel.from_pretrained(tiny_root / "txt2img" / "unet")
    sample = torch.randn((2, unet.config.in_channels, 8, 8), generator=torch.Generator().manual_seed(0))
    embeds = torch.randn((2, 77, unet.config.cross_attention_dim), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        got = denoiser(sample, torch.tensor(500), encoder_hidden_states=embeds)
        expected = plain(sample, torch.tensor(500), encoder_hidden_states=embeds).sample
    torch.testing.assert_close(got, expected, rtol=1e-4, atol=1e-5)


def test_a_float16_vae_overflow_is_decoded_again_in_float32(tiny_root: Path, caplog: pytest.LogCaptureFixture) -> None:
    """A float16 decode that overflows is redone in float32: finite pixels, the float32 result, VAE left in float16;
    the casts there and back log nothing (diffusers' 'should be kept in float32: []' on each is quieted)."""
    vae = AutoencoderKL.from_pretrained(tiny_root / "txt2img", subfolder="vae")
    with torch.no_grad():
        vae.decoder.conv_in.weight.mul_(1e4)  # weights still fit float16; activations go far beyond its 65504
        latents = 100 * torch.randn((1, 4, 8, 8), generator=torch.Generator().manual_seed(0))
        reference = vae.decode(latents, return_dict=False)[0]
        vae.to(torch.float16)
        plain = vae.decode(latents.half(), return_dict=False)[0]
        assert not torch.isfinite(plain).all()
        caplog.clear()  # the test's own cast above logs it
        with caplog.at_level(logging.WARNING):
            guarded = decode_guarded(vae, latents.half())
    assert not caplog.records, caplog.text
    assert vae.dtype == torch.float16
    assert torch.isfinite(guarded).all()
    np.testing.assert_allclose(guarded.float().numpy(), reference.numpy(), atol=1e-2)


def test_a_float16_decode_that_fits_is_not_redone(tiny_root: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The guard costs one check: a finite float16 decode is returned as is, in float16."""
    vae = AutoencoderKL.from_pretrained(tiny_root / "txt2img", subfolder="vae").to(torch.float16)
    calls = []
    decode = vae.decode

    def counted(*args: Any, **kwargs: Any) -> Any:
        calls.append(args[0].dtype)
        return decode(*args, **kwargs)

    monkeypatch.setattr(vae, "decode", counted)
    with torch.no_grad():
        out = decode_guarded(vae, torch.randn((1, 4, 8, 8)).half())
    assert out.dtype == torch.float16
    assert calls == [torch.float16]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_vae_output_becomes_the_same_pixels_as_diffusers_postprocess(dtype: torch.dtype) -> None:
    """to_pil does the 8-bit conversion where the tensor is (the GPU in the engine) and must not change a pixel,
    also for values outside [-1, 1] and exactly halfway between two 8-bit levels (rounded half to even)."""
    from diffusers.image_processor import VaeImageProcessor

    generator = torch.Generator().manual_seed(0)
    decoded = (torch.randn((3, 3, 24, 40), generator=generator) * 0.8).to(dtype)
    decoded[0, 0, 0, :6] = torch.tensor([-1.5, 1.5, -1.0, 1.0, 0.0, (0.5 / 255) * 2 - 1], dtype=dtype)
    stock = VaeImageProcessor().postprocess(decoded, output_type="pil", do_denormalize=[True] * len(decoded))
    ours = to_pil(decoded)
    assert [image.size for image in ours] == [(40, 24)] * 3
    assert [image.mode for image in ours] == ["RGB"] * 3
    for mine, theirs in zip(ours, stock, strict=True):
        assert np.array_equal(np.asarray(mine), np.asarray(theirs))
