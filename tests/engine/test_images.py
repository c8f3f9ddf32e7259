"""Tests for engine.images: decoding uploads, masks, and PNG parameters; all inputs built in memory."""

from __future__ import annotations

import functools
import io
import json
import resource
import struct
import time
import warnings
import zipfile
import zlib
from typing import Literal

import numpy as np
import pytest
from PIL import Image, ImageCms, ImageFile, PngImagePlugin

from engine.errors import UserError
from engine.images import decode_image, encode_png, prepare_mask, read_parameters
from engine.protocol import SCHEDULERS

LIMIT = 4096 * 4096
"""16.8 MP, the pixel limit most tests decode under."""

FORMATS_TEXT = "PNG, JPEG, WebP, GIF, BMP or TIFF"


def encode(image: Image.Image, fmt: str, **options: object) -> bytes:
    """Save `image` in `fmt` to bytes."""
    buffer = io.BytesIO()
    image.save(buffer, format=fmt, **options)
    return buffer.getvalue()


def decode(data: bytes, *, max_bytes: int | None = None) -> Image.Image:
    """Decode under the default test limit."""
    return decode_image(data, max_pixels=LIMIT, max_bytes=max_bytes)


def png_chunk(kind: bytes, body: bytes) -> bytes:
    """One PNG chunk with its length and CRC."""
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(kind + body))


@functools.cache
def black_png(width: int, height: int) -> bytes:
    """A valid 1-bit black PNG of any size, written by hand without allocating its pixels."""
    row = bytes(1 + (width + 7) // 8)  # filter byte, then 8 pixels a byte
    compressor = zlib.compressobj(1)
    body = b"".join(compressor.compress(row * min(256, height - top)) for top in range(0, height, 256))
    header = struct.pack(">IIBBBBB", width, height, 1, 0, 0, 0, 0)
    return (
        b"\x89PNG\r\n\x1a\n"
        + png_chunk(b"IHDR", header)
        + png_chunk(b"IDAT", body + compressor.flush())
        + png_chunk(b"IEND", b"")
    )


def two_frames(fmt: str) -> bytes:
    """An animation whose first frame is red and second blue."""
    red, blue = Image.new("RGB", (16, 8), (255, 0, 0)), Image.new("RGB", (16, 8), (0, 0, 255))
    data = encode(red, fmt, save_all=True, append_images=[blue], duration=100, loop=0)
    with Image.open(io.BytesIO(data)) as opened:
        assert getattr(opened, "n_frames", 1) == 2
    return data


def pixels(image: Image.Image) -> list[tuple[int, ...]]:
    """The pixels of a one-row image, left to right."""
    return [tuple(value) for value in np.asarray(image)[0].tolist()]


def message(excinfo: pytest.ExceptionInfo[UserError]) -> str:
    """The text a user would see."""
    return str(excinfo.value)


# decode_image: formats and the result


@pytest.mark.parametrize("fmt", ["PNG", "JPEG", "WEBP", "GIF", "BMP", "TIFF"])
def test_decodes_every_accepted_format_to_rgb(fmt: str) -> None:
    """PNG, JPEG, WebP, GIF, BMP and TIFF decode to an RGB image of the same size and colour."""
    data = encode(Image.new("RGB", (8, 6), (200, 40, 90)), fmt)
    image = decode(data)
    assert image.mode == "RGB"
    assert image.size == (8, 6)
    assert np.abs(np.asarray(image).astype(int) - (200, 40, 90)).max() <= 6


def test_result_is_loaded_and_carries_no_metadata() -> None:
    """The result is a plain in-memory image, detached from the file, with an empty info dict."""
    profile = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    data = encode(Image.new("RGB", (4, 4), "red"), "PNG", icc_profile=profile, dpi=(300, 300))
    image = decode(data)
    assert not isinstance(image, ImageFile.ImageFile)
    assert image.info == {}
    assert image.getpixel((0, 0)) == (255, 0, 0)


def test_messages_start_with_the_name_of_the_input() -> None:
    """`what` names the input at the start of every message."""
    with pytest.raises(UserError) as excinfo:
        decode_image(b"", what="mask", max_pixels=LIMIT)
    assert message(excinfo).startswith("The mask is empty")


# decode_image: file size and type


def test_empty_bytes_are_rejected() -> None:
    """Zero bytes name the problem and the accepted formats."""
    with pytest.raises(UserError) as excinfo:
        decode(b"")
    assert message(excinfo) == f"The image is empty (0 bytes); send a {FORMATS_TEXT} file."


def test_file_over_max_bytes_is_rejected_before_decoding() -> None:
    """The byte limit is checked first, with the size, the limit and the fix."""
    with pytest.raises(UserError) as excinfo:
        decode(bytes(12_300_000), max_bytes=10_000_000)
    assert message(excinfo) == "The image is 12.3 MB; the limit is 10 MB, send a smaller file."


@pytest.mark.parametrize(
    ("size", "limit", "expected"),
    [
        (10_000_001, 10_000_000, "is 10.1 MB; the limit is 10 MB"),
        (10_485_761, 10_485_760, "is 10.5 MB; the limit is 10.4 MB"),
        (1_500, 1_000, "is 1.5 kB; the limit is 1 kB"),
    ],
)
def test_file_size_never_reads_as_equal_to_its_limit(size: int, limit: int, expected: str) -> None:
    """Sizes round up and limits down, in kB below 1 MB, so a file just over shows as over."""
    with pytest.raises(UserError, match=expected):
        decode(bytes(size), max_bytes=limit)


def test_file_of_exactly_max_bytes_is_accepted() -> None:
    """The byte limit is inclusive."""
    data = encode(Image.new("RGB", (4, 4)), "PNG")
    assert decode(data, max_bytes=len(data)).size == (4, 4)


@pytest.mark.parametrize(
    ("data", "kind"),
    [
        (b"%PDF-1.7\n%\xe2\xe3\xcf\xd3\n1 0 obj\n", "is a PDF document"),
        (b"\x00\x00\x00\x18ftypheic\x00\x00\x00\x00mif1heic", "is a HEIC photo"),
        (b"\x00\x00\x00\x1cftypavif\x00\x00\x00\x00", "is an AVIF image"),
        (b'<?xml version="1.0"?><svg xmlns="http://www.w3.org/2000/svg"/>', "is an SVG drawing"),
        ("a cat in a hat, watercolour, ünïcödé\n".encode(), "is a text file"),
        (bytes(range(7, 200)) * 3, "is not in an image format the bot reads"),
    ],
)
def test_file_that_is_not_an_image_names_the_accepted_formats(data: bytes, kind: str) -> None:
    """Non-images say what they look like (where known) and which formats are accepted."""
    with pytest.raises(UserError) as excinfo:
        decode(data)
    assert message(excinfo).startswith(f"The image {kind}")
    assert f"send a {FORMATS_TEXT} file" in message(excinfo)


def test_zip_archive_is_not_an_image() -> None:
    """A ZIP archive (even one holding a PNG) is rejected as such."""
    buffer = io.BytesIO()
    with zipfile.ZipFile(buffer, "w") as archive:
        archive.writestr("cat.png", encode(Image.new("RGB", (4, 4)), "PNG"))
    with pytest.raises(UserError, match=r"^The image is a ZIP archive, not an image the bot reads"):
        decode(buffer.getvalue())


def test_image_format_pillow_reads_but_the_bot_does_not_is_rejected() -> None:
    """Only the six accepted formats are opened: an ICO file is refused like any other file."""
    data = encode(Image.new("RGB", (16, 16), "red"), "ICO")
    with pytest.raises(UserError, match=f"send a {FORMATS_TEXT} file"):
        decode(data)


# decode_image: damaged files


@pytest.mark.parametrize(
    ("fmt", "name"),
    [("PNG", "PNG"), ("JPEG", "JPEG"), ("GIF", "GIF"), ("WEBP", "WebP"), ("BMP", "BMP"), ("TIFF", "TIFF")],
)
def test_truncated_file_is_rejected_as_damaged(fmt: str, name: str) -> None:
    """A file cut in half fails with a clear message naming its format, not a gray-filled image."""
    noise = Image.effect_noise((64, 64), 64).convert("RGB")
    data = encode(noise, fmt)
    with pytest.raises(UserError) as excinfo:
        decode(data[: len(data) // 2])
    assert message(excinfo) == (
        f"The image is a damaged or incomplete {name} file and cannot be read; "
        "open it in an image editor, save it again and resend it, or send a different file."
    )


def test_file_with_valid_signature_but_garbage_header_is_damaged() -> None:
    """PNG magic bytes followed by garbage read as a damaged PNG, not as an unknown format."""
    with pytest.raises(UserError, match=r"^The image is a damaged or incomplete PNG file"):
        decode(b"\x89PNG\r\n\x1a\n" + bytes(range(256)) * 4)


def test_decoding_leaves_pillow_globals_alone() -> None:
    """Decoding neither sets LOAD_TRUNCATED_IMAGES nor changes MAX_IMAGE_PIXELS."""
    before = (ImageFile.LOAD_TRUNCATED_IMAGES, Image.MAX_IMAGE_PIXELS)
    data = encode(Image.new("RGB", (32, 32)), "PNG")
    decode(data)
    with pytest.raises(UserError):
        decode(data[:-20])
    with pytest.raises(UserError):
        decode(black_png(30000, 30000))
    after = (ImageFile.LOAD_TRUNCATED_IMAGES, Image.MAX_IMAGE_PIXELS)
    assert after == before
    assert ImageFile.LOAD_TRUNCATED_IMAGES is False


# decode_image: pixel limit and decompression bombs


def test_decompression_bomb_is_rejected_from_the_header_quickly() -> None:
    """A 30000x30000 PNG of a few hundred KB is refused in under a second without decoding it."""
    bomb = black_png(30000, 30000)
    assert len(bomb) < 1_000_000
    peak_before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss  # KiB on Linux
    started = time.perf_counter()
    with pytest.raises(UserError) as excinfo:
        decode(bomb)
    assert time.perf_counter() - started < 1.0
    assert resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - peak_before < 100_000
    assert message(excinfo) == (
        "The image is 30000x30000 (900.0 MP); the limit is 16.8 MP, resize it to at most 4096x4096."
    )


def test_pixel_limit_does_not_rely_on_pillows_global(monkeypatch: pytest.MonkeyPatch) -> None:
    """With Pillow's own guard switched off, the header is still checked against max_pixels."""
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)
    with pytest.raises(UserError) as excinfo:
        decode(black_png(5000, 5000))
    assert message(excinfo) == (
        "The image is 5000x5000 (25.0 MP); the limit is 16.8 MP, resize it to at most 4096x4096."
    )


@pytest.mark.parametrize("action", ["error", "ignore"])
def test_pillows_bomb_warning_zone_gives_the_same_message(action: Literal["error", "ignore"]) -> None:
    """100 MP is where Pillow warns: whether warnings are errors or ignored, the message is ours."""
    with warnings.catch_warnings():
        warnings.simplefilter(action, Image.DecompressionBombWarning)
        with pytest.raises(UserError) as excinfo:
            decode(black_png(10000, 10000))
    assert message(excinfo).startswith("The image is 10000x10000 (100.0 MP); the limit is 16.8 MP")


def test_pixel_limit_is_inclusive_and_suggests_a_size_that_fits() -> None:
    """An image of exactly max_pixels decodes; one over gets the largest same-shape size that fits."""
    assert decode_image(black_png(64, 64), max_pixels=4096).size == (64, 64)
    with pytest.raises(UserError) as excinfo:
        decode_image(black_png(130, 65), max_pixels=4096)
    assert message(excinfo) == (
        "The image is 130x65 (8450 pixels); the limit is 4096 pixels, resize it to at most 90x45."
    )


# decode_image: colour modes


def test_transparent_rgba_is_composited_onto_white() -> None:
    """Transparent pixels become white, opaque ones keep their colour, half-transparent black is mid-gray."""
    rgba = Image.new("RGBA", (3, 1))
    rgba.putdata([(0, 0, 0, 0), (255, 0, 0, 255), (0, 0, 0, 128)])
    result = pixels(decode(encode(rgba, "PNG")))
    assert result[:2] == [(255, 255, 255), (255, 0, 0)]
    assert all(abs(value - 127) <= 1 for value in result[2])


def test_transparent_gray_with_alpha_is_composited_onto_white() -> None:
    """LA images: transparent pixels become white, opaque gray stays gray."""
    la = Image.new("LA", (2, 1))
    la.putdata([(0, 0), (77, 255)])
    assert pixels(decode(encode(la, "PNG"))) == [(255, 255, 255), (77, 77, 77)]


def test_palette_image_with_transparency_is_composited_onto_white() -> None:
    """A palette PNG's transparent index becomes white; other indices keep their colour."""
    palette = Image.new("P", (2, 1))
    palette.putpalette([0, 0, 0, 0, 200, 0])
    palette.putdata([0, 1])
    data = encode(palette, "PNG", transparency=0)
    assert pixels(decode(data)) == [(255, 255, 255), (0, 200, 0)]


def test_palette_image_without_transparency_uses_its_palette() -> None:
    """A palette PNG without transparency maps each index to its palette colour."""
    palette = Image.new("P", (2, 1))
    palette.putpalette([10, 20, 30, 0, 200, 0])
    palette.putdata([0, 1])
    assert pixels(decode(encode(palette, "PNG"))) == [(10, 20, 30), (0, 200, 0)]


def test_16_bit_grayscale_png_is_scaled_to_8_bits() -> None:
    """I;16 maps 0-65535 onto 0-255: 65535 is white, 32896 is 128, not clipped to white."""
    data = encode(Image.fromarray(np.array([[0, 25700, 32896, 65535]], dtype=np.uint16)), "PNG")
    with Image.open(io.BytesIO(data)) as opened:
        assert opened.mode == "I;16"
    assert pixels(decode(data)) == [(0, 0, 0), (100, 100, 100), (128, 128, 128), (255, 255, 255)]


@pytest.mark.parametrize(
    ("values", "expected"),
    [
        ([0, 100, 255], [0, 100, 255]),
        ([0, 32896, 65535], [0, 128, 255]),
        ([-5, 600_000, 1_000_000], [0, 153, 255]),
    ],
)
def test_32_bit_integer_image_is_scaled_by_its_range(values: list[int], expected: list[int]) -> None:
    """Mode I reads as 8-bit if it fits, else 16-bit, else stretched to its brightest pixel."""
    data = encode(Image.fromarray(np.array([values], dtype=np.int32)), "TIFF")
    with Image.open(io.BytesIO(data)) as opened:
        assert opened.mode == "I"
    assert pixels(decode(data)) == [(value,) * 3 for value in expected]


@pytest.mark.parametrize(
    ("values", "expected"),
    [([0.0, 0.5, 1.0], [0, 128, 255]), ([-1.0, 127.5, 255.0], [0, 128, 255])],
)
def test_float_image_is_scaled_by_its_range(values: list[float], expected: list[int]) -> None:
    """Mode F reads as 0.0-1.0 if it fits, else as 0-255; negative values become black."""
    data = encode(Image.fromarray(np.array([values], dtype=np.float32)), "TIFF")
    with Image.open(io.BytesIO(data)) as opened:
        assert opened.mode == "F"
    assert pixels(decode(data)) == [(value,) * 3 for value in expected]


@pytest.mark.parametrize("with_profile", [False, True])
def test_cmyk_jpeg_is_converted_to_rgb(with_profile: bool) -> None:
    """CMYK JPEGs, with or without an embedded ICC profile, convert to RGB (no colour management)."""
    cmyk = Image.new("CMYK", (8, 8), (0, 255, 255, 0))
    options = {"icc_profile": ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()}
    data = encode(cmyk, "JPEG", **(options if with_profile else {}))
    with Image.open(io.BytesIO(data)) as opened:
        assert opened.mode == "CMYK"
        assert ("icc_profile" in opened.info) is with_profile
    image = decode(data)
    assert image.mode == "RGB"
    assert np.abs(np.asarray(image).astype(int) - (255, 0, 0)).max() <= 6


def test_one_bit_and_grayscale_images_become_rgb() -> None:
    """Mode 1 becomes black and white, mode L keeps its gray level in all three channels."""
    bilevel = Image.new("1", (2, 1))
    bilevel.putpixel((1, 0), 1)
    assert pixels(decode(encode(bilevel, "PNG"))) == [(0, 0, 0), (255, 255, 255)]
    assert pixels(decode(encode(Image.new("L", (1, 1), 77), "PNG"))) == [(77, 77, 77)]


def test_exif_orientation_is_applied() -> None:
    """A phone photo tagged "rotate 90 degrees clockwise" (orientation 6) comes out upright."""
    photo = Image.new("RGB", (40, 20), (255, 0, 0))
    photo.paste((0, 0, 255), (20, 0, 40, 20))  # left half red, right half blue
    exif = Image.Exif()
    exif[0x0112] = 6
    image = decode(encode(photo, "JPEG", exif=exif.tobytes(), quality=95))
    assert image.size == (20, 40)
    top, bottom = image.getpixel((10, 5)), image.getpixel((10, 35))
    assert isinstance(top, tuple)
    assert isinstance(bottom, tuple)
    assert top[0] > 200
    assert top[2] < 60
    assert bottom[2] > 200
    assert bottom[0] < 60


@pytest.mark.parametrize("fmt", ["GIF", "WEBP", "PNG"])
def test_animation_gives_its_first_frame(fmt: str) -> None:
    """Animated GIF, WebP and APNG decode to their first frame (red), not a later one (blue)."""
    image = decode(two_frames(fmt))
    assert image.size == (16, 8)
    assert np.abs(np.asarray(image).astype(int) - (255, 0, 0)).max() <= 6


# prepare_mask


def test_mask_becomes_l_with_white_meaning_repaint() -> None:
    """An RGB mask of the right size becomes mode L with white 255 and black 0."""
    mask = Image.new("RGB", (2, 1))
    mask.putpixel((1, 0), (255, 255, 255))
    result = prepare_mask(mask, (2, 1))
    assert result.mode == "L"
    assert list(np.asarray(result)[0]) == [0, 255]


def test_transparent_mask_areas_are_kept() -> None:
    """A mask with alpha is composited onto black: transparent areas are not repainted."""
    mask = Image.new("RGBA", (2, 1))
    mask.putdata([(255, 255, 255, 0), (255, 255, 255, 255)])
    assert list(np.asarray(prepare_mask(mask, (2, 1)))[0]) == [0, 255]


def test_mask_of_another_size_is_resized_bilinearly_keeping_gray_edges() -> None:
    """A smaller mask is stretched to the image size; the edge between black and white stays soft."""
    mask = Image.new("L", (4, 4))
    mask.paste(255, (2, 0, 4, 4))
    result = np.asarray(prepare_mask(mask, (16, 8)))
    assert result.shape == (8, 16)
    assert result[:, 0].max() == 0
    assert result[:, -1].min() == 255
    assert ((result > 0) & (result < 255)).any()


def test_16_bit_mask_is_scaled_not_clipped() -> None:
    """A 16-bit mask maps 65535 to white and 0 to black."""
    mask = Image.fromarray(np.array([[0, 65535]], dtype=np.uint16))
    assert list(np.asarray(prepare_mask(mask, (2, 1)))[0]) == [0, 255]


@pytest.mark.parametrize("brightest", [0, 127])
def test_all_black_mask_is_rejected(brightest: int) -> None:
    """A mask with no pixel at 128 or above would repaint nothing, and says how to fix it."""
    with pytest.raises(UserError) as excinfo:
        prepare_mask(Image.new("L", (4, 4), brightest), (4, 4))
    assert message(excinfo) == (
        "The mask is all black, so nothing would be repainted. Paint the areas to change in white."
    )


@pytest.mark.parametrize("row", [1000, 1016])
def test_strokes_too_thin_to_survive_the_resize_still_repaint_where_they_are(row: int) -> None:
    """A 2-pixel line painted on a large mask averages to gray below 128 when shrunk: instead of calling the mask
    all black (the user did paint), the 8x8 blocks (latent pixels) the line falls in are repainted whole, so the
    mask the pipeline samples down to latent size (nearest, every 8th pixel) still holds the line."""
    mask = Image.new("L", (2048, 2048))
    for x in range(2048):
        mask.putpixel((x, row), 255)
        mask.putpixel((x, row + 1), 255)
    shrunk = np.asarray(prepare_mask(mask, (512, 512)))
    assert set(np.unique(shrunk)) == {0, 255}
    block = row // 4 // 8  # the line's row at 512 px, then its latent row
    assert sorted({int(y) for y in np.nonzero(shrunk)[0]}) == list(range(block * 8, block * 8 + 8))
    latent = np.asarray(Image.fromarray(shrunk).resize((64, 64), Image.Resampling.NEAREST))
    assert (latent[block] == 255).all()
    assert latent.sum() == 255 * 64


@pytest.mark.parametrize("value", [128, 255])
def test_mask_reaching_128_or_all_white_is_valid(value: int) -> None:
    """A mask whose brightest pixel is 128 is accepted, and so is an all-white mask."""
    assert prepare_mask(Image.new("L", (4, 4), value), (4, 4)).getextrema() == (value, value)


# encode_png and read_parameters

PARAMETERS: dict[str, object] = {
    "prompt": "一只猫 🐱 in a café, line two\nand more",
    "negative_prompt": "blurry",
    "steps": 30,
    "scheduler": "dpmpp_2m_karras",
    "guidance": 7.5,
    "seed": 42,
    "width": 512,
    "height": 512,
    "model": "sd15",
    "strength": 0.75,
    "clip_skip": 2,
}


def test_parameters_round_trip_with_unicode() -> None:
    """read_parameters returns exactly what encode_png stored, Unicode prompt included."""
    png = encode_png(Image.new("RGB", (8, 8), "red"), parameters=PARAMETERS)
    assert read_parameters(png) == PARAMETERS
    assert decode(png).getpixel((0, 0)) == (255, 0, 0)


def test_easelbot_chunk_is_compact_sorted_itxt_json() -> None:
    """The easelbot iTXt chunk holds JSON with sorted keys, no spaces and raw UTF-8."""
    png = encode_png(Image.new("RGB", (2, 2)), parameters={"seed": 1, "prompt": "é"})
    assert b"iTXteaselbot\x00" in png
    assert b"iTXtparameters\x00" in png
    with Image.open(io.BytesIO(png)) as opened:
        assert opened.info["easelbot"] == '{"prompt":"é","seed":1}'


def test_parameters_chunk_is_automatic1111_text() -> None:
    """The parameters chunk: prompt, negative prompt, then the settings line in A1111 order."""
    png = encode_png(Image.new("RGB", (2, 2)), parameters=PARAMETERS)
    with Image.open(io.BytesIO(png)) as opened:
        text = opened.info["parameters"]
    assert text == (
        "一只猫 🐱 in a café, line two\nand more\n"
        "Negative prompt: blurry\n"
        "Steps: 30, Sampler: DPM++ 2M Karras, CFG scale: 7.5, Seed: 42, Size: 512x512, Model: sd15, "
        "Denoising strength: 0.75, Clip skip: 2"
    )


@pytest.mark.parametrize(
    ("scheduler", "sampler"),
    [
        ("dpmpp_2m_karras", "DPM++ 2M Karras"),
        ("dpmpp_2m", "DPM++ 2M"),
        ("euler_a", "Euler a"),
        ("euler", "Euler"),
        ("ddim", "DDIM"),
        ("lms", "LMS"),
        ("pndm", "PLMS"),
        ("unipc", "UniPC"),
        ("lcm", "LCM"),
    ],
)
def test_parameters_chunk_names_the_sampler_as_automatic1111_does(scheduler: str, sampler: str) -> None:
    """The parameters chunk writes A1111's sampler name (what its infotext parser and civitai read);
    the easelbot JSON chunk keeps our own scheduler name."""
    png = encode_png(Image.new("RGB", (2, 2)), parameters={"prompt": "a cat", "scheduler": scheduler, "seed": 1})
    with Image.open(io.BytesIO(png)) as opened:
        assert opened.info["parameters"] == f"a cat\nSampler: {sampler}, Seed: 1"
    assert read_parameters(png)["scheduler"] == scheduler


def test_every_scheduler_has_an_automatic1111_sampler_name() -> None:
    """No scheduler a user can pick reaches the parameters chunk under our own name."""
    for scheduler in SCHEDULERS:
        png = encode_png(Image.new("RGB", (2, 2)), parameters={"scheduler": scheduler})
        with Image.open(io.BytesIO(png)) as opened:
            assert opened.info["parameters"] != f"Sampler: {scheduler}"


def test_parameters_text_skips_empty_negative_bytes_and_none_and_quotes_commas() -> None:
    """No negative-prompt line when it is empty; bytes and None are left out; commas are quoted."""
    parameters = {
        "prompt": "a cat",
        "negative_prompt": "",
        "seed": 7,
        "init_image": b"\x89PNG...",
        "lora": "style: ink, 0.8",
        "upscaler": None,
    }
    png = encode_png(Image.new("RGB", (2, 2)), parameters=parameters)
    with Image.open(io.BytesIO(png)) as opened:
        assert opened.info["parameters"] == 'a cat\nSeed: 7, Lora: "style: ink, 0.8"'
    assert read_parameters(png) == {
        "prompt": "a cat",
        "negative_prompt": "",
        "seed": 7,
        "lora": "style: ink, 0.8",
        "upscaler": None,
    }


def test_png_without_parameters_reads_as_empty() -> None:
    """encode_png without parameters writes no text chunks; read_parameters then returns {}."""
    png = encode_png(Image.new("RGB", (2, 2)))
    assert b"iTXt" not in png
    assert read_parameters(png) == {}


def test_compress_level_is_passed_to_the_encoder() -> None:
    """compress_level 0 stores the pixels uncompressed, so the file is larger than at level 9."""
    noise = Image.new("RGB", (64, 64), "white")
    assert len(encode_png(noise, compress_level=0)) > len(encode_png(noise, compress_level=9))


def test_read_parameters_rejects_a_file_that_is_not_a_png() -> None:
    """A JPEG or random bytes give a UserError that says to send the bot's PNG."""
    with pytest.raises(UserError, match="could not be read as a PNG image"):
        read_parameters(encode(Image.new("RGB", (2, 2)), "JPEG"))


def test_read_parameters_rejects_damaged_json() -> None:
    """An easelbot chunk that is not a JSON object is reported as damaged."""
    for text in ("{not json", json.dumps([1, 2])):
        info = PngImagePlugin.PngInfo()
        info.add_itxt("easelbot", text)
        png = encode(Image.new("RGB", (2, 2)), "PNG", pnginfo=info)
        with pytest.raises(UserError, match="easelbot parameters are damaged"):
            read_parameters(png)


# encode_png for large images: bands of rows deflated on several threads

TALL = (1000, 1201)
"""1.2 MP, above PARALLEL_PNG_PIXELS, with a row count that 2, 3, 4, 5, 7 and 8 bands do not divide."""


def photo_like(size: tuple[int, int], mode: str, seed: int = 0) -> Image.Image:
    """Smooth gradients with slight noise, a flat band and hard edges, so every PNG filter gets picked."""
    width, height = size
    rng = np.random.default_rng(seed)
    y, x = np.mgrid[0:height, 0:width]
    channels = len(mode)
    base = np.stack([(x * (k + 1) + y * (channels - k)) // 12 for k in range(channels)], axis=-1)
    base = base + rng.integers(-2, 3, base.shape)
    base[height // 3 : height // 2] = 0  # black: None
    base[:, width // 2 : width // 2 + 40] = rng.integers(0, 256, (height, 40, channels))  # noise: edges
    pixels = np.clip(base, 0, 255).astype(np.uint8)
    return Image.fromarray(pixels[..., 0] if channels == 1 else pixels, mode)


def png_chunks(png: bytes) -> list[tuple[bytes, bytes]]:
    """The (type, body) of each chunk after the signature, checking each CRC."""
    chunks, offset = [], 8
    while offset < len(png):
        (length,) = struct.unpack(">I", png[offset : offset + 4])
        kind, body = png[offset + 4 : offset + 8], png[offset + 8 : offset + 8 + length]
        (crc,) = struct.unpack(">I", png[offset + 8 + length : offset + 12 + length])
        assert crc == zlib.crc32(kind + body)
        chunks.append((kind, body))
        offset += 12 + length
    return chunks


def pillow_png(image: Image.Image, parameters: dict[str, object] | None = None, compress_level: int = 4) -> bytes:
    """What Pillow itself writes for `image`, with encode_png's text chunks when `parameters` are given."""
    info = PngImagePlugin.PngInfo()
    if parameters:
        info.add_itxt("easelbot", json.dumps(parameters, sort_keys=True, separators=(",", ":"), ensure_ascii=False))
        with Image.open(io.BytesIO(encode_png(Image.new("RGB", (2, 2)), parameters=parameters))) as small:
            info.add_itxt("parameters", small.info["parameters"])
    return encode(image, "PNG", pnginfo=info, compress_level=compress_level)


@pytest.fixture
def pillow_save_forbidden(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if anything saves through Pillow."""

    def refuse(*args: object, **kwargs: object) -> None:
        raise AssertionError("encode_png saved through Pillow")

    monkeypatch.setattr(Image.Image, "save", refuse)


@pytest.mark.usefixtures("pillow_save_forbidden")
@pytest.mark.parametrize("mode", ["RGB", "RGBA", "L", "LA"])
def test_large_image_is_written_without_pillow_and_decodes_to_the_same_pixels(mode: str) -> None:
    """A large L, LA, RGB or RGBA image is written by encode_png itself; Pillow verifies its CRCs and
    decodes exactly the pixels that went in, in the same mode."""
    image = photo_like(TALL, mode)
    png = encode_png(image, parameters=PARAMETERS, threads=3)
    with Image.open(io.BytesIO(png)) as opened:
        opened.verify()
    with Image.open(io.BytesIO(png)) as opened:
        opened.load()
        assert opened.mode == mode
        assert np.array_equal(np.asarray(opened), np.asarray(image))


@pytest.mark.parametrize("threads", [1, 2, 3, 5, 7, 8, 16])
def test_any_band_count_gives_the_same_pixels(threads: int) -> None:
    """Band counts that do not divide the rows, and a single band, all decode to the input pixels."""
    image = photo_like(TALL, "RGB", seed=threads)
    with Image.open(io.BytesIO(encode_png(image, threads=threads))) as opened:
        assert np.array_equal(np.asarray(opened), np.asarray(image))


def test_more_threads_than_rows_gives_one_band_a_row() -> None:
    """A wide image with fewer rows than threads still decodes to its pixels."""
    image = photo_like((300_000, 4), "RGB")
    with Image.open(io.BytesIO(encode_png(image, threads=8))) as opened:
        assert np.array_equal(np.asarray(opened), np.asarray(image))


def test_large_png_has_the_chunks_pillow_writes_except_the_pixel_data() -> None:
    """Signature, IHDR, the easelbot and parameters iTXt chunks byte for byte as Pillow writes them, in
    Pillow's order, then IDAT and IEND; every CRC is right."""
    image = photo_like(TALL, "RGB")
    ours, pillows = png_chunks(encode_png(image, parameters=PARAMETERS)), png_chunks(pillow_png(image, PARAMETERS))
    assert [chunk for chunk in ours if chunk[0] != b"IDAT"] == [chunk for chunk in pillows if chunk[0] != b"IDAT"]
    kinds = [kind for kind, _ in ours]
    assert kinds[:3] == [b"IHDR", b"iTXt", b"iTXt"]
    assert set(kinds[3:-1]) == {b"IDAT"}
    assert kinds[-1] == b"IEND"


def test_large_png_pixel_data_is_one_zlib_stream_with_every_filter_type() -> None:
    """The IDAT data is one zlib stream (header, deflate, Adler-32, nothing after) of filtered rows
    that uses all five PNG filter types, picked per row as Pillow does."""
    image = photo_like(TALL, "RGB")
    data = b"".join(body for kind, body in png_chunks(encode_png(image, threads=4)) if kind == b"IDAT")
    decompressor = zlib.decompressobj()
    rows = decompressor.decompress(data)
    assert decompressor.eof
    assert decompressor.unused_data == b""
    stride = 1 + 3 * TALL[0]
    assert len(rows) == stride * TALL[1]
    assert set(rows[::stride]) == {0, 1, 2, 3, 4}


def test_large_png_keeps_parameters_readable() -> None:
    """read_parameters reads a large PNG's parameters back, and image.info holds the A1111 text."""
    png = encode_png(photo_like(TALL, "RGB"), parameters=PARAMETERS)
    assert read_parameters(png) == PARAMETERS
    with Image.open(io.BytesIO(png)) as opened:
        assert opened.info["parameters"].startswith(
            "一只猫 🐱 in a café, line two\nand more\nNegative prompt: blurry\n"
        )


@pytest.mark.parametrize("compress_level", [0, 1, 9])
def test_large_png_honours_the_compress_level(compress_level: int) -> None:
    """Every level decodes to the same pixels; level 0 stores the rows, so it is the largest."""
    image = photo_like(TALL, "L")
    png = encode_png(image, compress_level=compress_level, threads=2)
    with Image.open(io.BytesIO(png)) as opened:
        assert np.array_equal(np.asarray(opened), np.asarray(image))
    if compress_level == 0:
        assert len(png) > TALL[0] * TALL[1]
    else:
        assert len(png) < len(encode_png(image, compress_level=0))


@pytest.mark.parametrize(
    "image",
    [
        photo_like((512, 512), "RGB"),
        photo_like((999, 1000), "RGBA"),
        photo_like(TALL, "RGB").convert("P"),
        Image.new("I;16", TALL, 300),
        Image.new("1", TALL, 1),
    ],
    ids=["small-rgb", "just-under-1-mp", "palette", "16-bit", "1-bit"],
)
def test_small_images_and_other_modes_go_through_pillow_unchanged(image: Image.Image) -> None:
    """Images under PARALLEL_PNG_PIXELS, and modes other than L, LA, RGB and RGBA, give exactly the
    bytes Pillow writes with the same text chunks."""
    assert encode_png(image, parameters=PARAMETERS) == pillow_png(image, PARAMETERS)


def test_large_image_with_an_icc_profile_goes_through_pillow() -> None:
    """Pillow writes an image's ICC profile (iCCP), so such an image keeps Pillow's path."""
    image = photo_like(TALL, "RGB")
    image.info["icc_profile"] = ImageCms.ImageCmsProfile(ImageCms.createProfile("sRGB")).tobytes()
    png = encode_png(image)
    assert png == pillow_png(image)
    assert b"iCCP" in png


def test_threads_below_one_are_refused() -> None:
    """threads=0 is a programming error, reported before anything is encoded."""
    with pytest.raises(ValueError, match="threads must be at least 1, not 0"):
        encode_png(Image.new("RGB", (2, 2)), threads=0)
