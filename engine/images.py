"""Decode user images, prepare inpainting masks and write PNGs with their generation parameters.

Imports only Pillow, numpy and the standard library: the bot process uses it too, without torch.

Every bad input raises `UserError` with a message that starts with the input's name ("The mask
..."), names the problem and the limit, and says what to change. Pillow's exceptions never escape;
they are chained (``from exc``) so the log keeps the detail.

Safety does not depend on Pillow's process-wide settings: the pixel limit is checked here from the
header before any pixel is decoded, whatever ``Image.MAX_IMAGE_PIXELS`` is, and nothing here sets
``Image.MAX_IMAGE_PIXELS`` or ``ImageFile.LOAD_TRUNCATED_IMAGES``. A truncated file fails in
``load()`` as long as nothing else in the process sets ``LOAD_TRUNCATED_IMAGES`` (Pillow then fills
the missing part with gray instead of failing).
"""

from __future__ import annotations

import codecs
import contextlib
import io
import json
import math
import os
import struct
import tempfile
from collections.abc import Mapping
from pathlib import Path
from typing import cast

import numpy as np
from PIL import Image, ImageOps, PngImagePlugin, UnidentifiedImageError

from engine.errors import UserError
from engine.protocol import SCHEDULERS

ACCEPTED_FORMATS = ("PNG", "JPEG", "WebP", "GIF", "BMP", "TIFF")
"""The formats `decode_image` opens, as users know them; APNG counts as PNG, MPO as JPEG."""

_PILLOW_FORMATS = tuple(name.upper() for name in ACCEPTED_FORMATS)
ACCEPTED_TEXT = "PNG, JPEG, WebP, GIF, BMP or TIFF"

_DECODE_ERRORS = (OSError, SyntaxError, ValueError, TypeError, IndexError, KeyError, EOFError, struct.error)
"""What Pillow's plugins raise on malformed data (`UnidentifiedImageError` is an `OSError`)."""

_TOO_LARGE_ERRORS = (Image.DecompressionBombError, Image.DecompressionBombWarning)
"""Pillow's own pixel guard; the warning arrives as an exception when warnings are errors."""

_SIGNATURES = (
    (0, b"\x89PNG\r\n\x1a\n", "PNG"),
    (0, b"\xff\xd8\xff", "JPEG"),
    (0, b"GIF87a", "GIF"),
    (0, b"GIF89a", "GIF"),
    (0, b"BM", "BMP"),
    (0, b"II*\x00", "TIFF"),
    (0, b"MM\x00*", "TIFF"),
    (8, b"WEBP", "WebP"),
)
"""Magic bytes of the accepted formats: a match that Pillow cannot read is a damaged file."""

_HEIF_BRANDS = (b"heic", b"heix", b"hevc", b"heim", b"heis", b"mif1", b"msf1")

_PARAMETER_LABELS = {
    "steps": "Steps",
    "scheduler": "Sampler",
    "guidance": "CFG scale",
    "seed": "Seed",
    "size": "Size",
    "model": "Model",
}
"""AUTOMATIC1111 labels, in the order they are written; "size" stands for width and height."""

_A1111_SAMPLERS = {**SCHEDULERS, "pndm": "PLMS", "lcm": "LCM"}
"""Our scheduler names -> the sampler names AUTOMATIC1111 writes (and its infotext parser, civitai and
SD Prompt Reader read); a name not listed is written as it is."""


def decode_image(
    data: bytes,
    *,
    what: str = "image",
    max_pixels: int,
    max_bytes: int | None = None,
    background: tuple[int, int, int] = (255, 255, 255),
) -> Image.Image:
    """Decode an uploaded file into an upright RGB image, fully loaded and with no metadata.

    `what` names the input in error messages ("The {what} is ..."). The pixel limit is checked from
    the header before any pixel is decoded. Animated files give their first frame; EXIF orientation
    is applied; transparency is composited onto `background` (white; pass black for masks, where
    transparent means keep); 16-bit and 32-bit images are scaled to 8 bits
    (see `_scale_to_8bit`); CMYK is converted without colour management. The result carries an empty
    ``info`` (no ICC profile, EXIF or text), so its pixel values are taken as sRGB.
    """
    if not data:
        raise UserError(f"The {what} is empty (0 bytes); send a {ACCEPTED_TEXT} file.")
    if max_bytes is not None and len(data) > max_bytes:
        size, limit = _file_sizes(len(data), max_bytes)
        raise UserError(f"The {what} is {size}; the limit is {limit}, send a smaller file.")
    try:
        opened = Image.open(io.BytesIO(data), formats=_PILLOW_FORMATS)
    except UnidentifiedImageError as exc:
        raise _unidentified(data, what) from exc
    except _TOO_LARGE_ERRORS as exc:
        raise _too_many_pixels(what, _header_size(data), max_pixels) from exc
    except _DECODE_ERRORS as exc:
        raise _damaged(data, what) from exc
    with opened:
        width, height = opened.size
        if width * height > max_pixels:
            raise _too_many_pixels(what, opened.size, max_pixels)
        try:
            opened.load()
            ImageOps.exif_transpose(opened, in_place=True)
        except _TOO_LARGE_ERRORS as exc:  # a later frame or tile larger than the header said
            raise _too_many_pixels(what, None, max_pixels) from exc
        except _DECODE_ERRORS as exc:
            raise _damaged(data, what) from exc
        return _to_rgb(opened, what, background)


def prepare_mask(mask: Image.Image, size: tuple[int, int]) -> Image.Image:
    """Turn a mask into mode "L" of `size`, where white (255) means repaint and black keeps.

    Colour masks become their luminance. A mask with transparency is first composited onto black,
    so transparent areas are kept (decode mask uploads with `decode_image(..., background=(0, 0, 0))`
    for the same meaning). A mask of another size
    is stretched to `size` with bilinear resampling and its soft gray edges are left as they are:
    the pipeline decides how to threshold them.

    Raises `UserError` if no pixel reaches 128 after resizing, since nothing would be repainted.
    An all-white mask is valid and repaints everything.
    """
    if mask.mode.startswith("I") or mask.mode == "F":
        mask = _scale_to_8bit(mask)
    if mask.has_transparency_data:
        black = Image.new("RGBA", mask.size, (0, 0, 0, 255))
        mask = Image.alpha_composite(black, mask.convert("RGBA"))
    gray = mask.convert("L")
    if gray.size != size:
        gray = gray.resize(size, Image.Resampling.BILINEAR)
    _, brightest = cast("tuple[int, int]", gray.getextrema())
    if brightest < 128:
        raise UserError("The mask is all black, so nothing would be repainted. Paint the areas to change in white.")
    return gray


def encode_png(image: Image.Image, *, parameters: Mapping[str, object] | None = None, compress_level: int = 4) -> bytes:
    """Encode `image` as PNG, with `parameters` in two iTXt chunks when given.

    ``easelbot`` holds compact JSON with sorted keys (read back by `read_parameters`);
    ``parameters`` holds the AUTOMATIC1111 text that other tools show (`_a1111_text`). Values that
    are bytes are left out of both; any other value JSON cannot encode raises `TypeError`.
    """
    info = PngImagePlugin.PngInfo()
    if parameters:
        kept = {key: value for key, value in parameters.items() if not _is_binary(value)}
        info.add_itxt("easelbot", json.dumps(kept, sort_keys=True, separators=(",", ":"), ensure_ascii=False))
        info.add_itxt("parameters", _a1111_text(kept))
    buffer = io.BytesIO()
    image.save(buffer, format="PNG", pnginfo=info, compress_level=compress_level)
    return buffer.getvalue()


def read_parameters(png: bytes) -> dict[str, object]:
    """Return the parameters `encode_png` stored in `png`, or {} when it has none.

    Only the header and the text chunks before the pixel data (where `encode_png` writes them) are
    read; no pixel is decoded.
    """
    try:
        with Image.open(io.BytesIO(png), formats=("PNG",)) as image:
            text = image.info.get("easelbot")
    except (*_TOO_LARGE_ERRORS, *_DECODE_ERRORS) as exc:
        raise UserError(
            "The file could not be read as a PNG image, so it has no easelbot parameters; "
            "send the PNG file the bot posted, unchanged."
        ) from exc
    if text is None:
        return {}
    try:
        parameters = json.loads(text)
    except (TypeError, ValueError):
        parameters = None
    if not isinstance(parameters, dict):
        raise UserError(
            "The PNG's easelbot parameters are damaged (not a JSON object); "
            "send the PNG file the bot posted, unchanged."
        )
    return parameters


def _to_rgb(image: Image.Image, what: str, background: tuple[int, int, int]) -> Image.Image:
    """Convert any Pillow mode to RGB, compositing transparency onto `background`."""
    if image.mode.startswith("I") or image.mode == "F":
        image = _scale_to_8bit(image)
    try:
        if image.has_transparency_data:
            under = Image.new("RGBA", image.size, (*background, 255))
            rgb = Image.alpha_composite(under, image.convert("RGBA")).convert("RGB")
        else:
            rgb = image.convert("RGB")
    except ValueError as exc:
        raise UserError(
            f"The {what} uses the {image.mode} colour mode, which cannot be converted to RGB; "
            "save it as an RGB PNG or JPEG and send it again."
        ) from exc
    rgb.info.clear()
    return rgb


def _scale_to_8bit(image: Image.Image) -> Image.Image:
    """Scale a 16-bit ("I;16*"), 32-bit integer ("I") or float ("F") image to mode "L".

    "I;16*" maps its full range 0-65535 to 0-255. "I" and "F" carry no bit depth, so the range is
    taken as the smallest of 255 or 65535 (and for "F" also 1.0) that holds the brightest pixel, or
    the brightest pixel itself beyond that; values below 0 become black.
    """
    pixels = np.nan_to_num(np.asarray(image, dtype=np.float32))
    if image.mode.startswith("I;16"):
        full_scale = 65535.0
    else:
        brightest = float(pixels.max(initial=0.0))
        scales = (1.0, 255.0, 65535.0) if image.mode == "F" else (255.0, 65535.0)
        full_scale = next((scale for scale in scales if brightest <= scale), brightest)
    scaled = np.rint(np.clip(pixels * (255.0 / full_scale), 0.0, 255.0)).astype(np.uint8)
    return Image.fromarray(scaled)


def _header_size(data: bytes) -> tuple[int, int] | None:
    """Read the size from the header for the message when Pillow's own pixel guard refused the file.

    Pillow's check lives in `Image.open`; its registered openers read the header without it. Returns
    None where the opener runs the check itself (some multi-frame formats) or fails.
    """
    Image.init()
    for name in _PILLOW_FORMATS:
        opener, accept = Image.OPEN.get(name, (None, None))
        if opener is None or (accept is not None and accept(data[:16]) is not True):
            continue
        try:
            with opener(io.BytesIO(data), "") as image:
                return image.size
        except (*_TOO_LARGE_ERRORS, *_DECODE_ERRORS):
            return None
    return None


def _too_many_pixels(what: str, size: tuple[int, int] | None, max_pixels: int) -> UserError:
    """Name the size, the limit and the largest size with the same aspect ratio that fits."""
    limit = f"the limit is {_pixel_count(max_pixels)}"
    if size is None:
        side = math.isqrt(max_pixels)
        return UserError(
            f"The {what} has more pixels than can be opened safely; {limit}, "
            f"resize it to at most {side}x{side} or the same area."
        )
    width, height = size
    scale = math.sqrt(max_pixels / (width * height))
    fit_width, fit_height = max(1, math.floor(width * scale)), max(1, math.floor(height * scale))
    return UserError(
        f"The {what} is {width}x{height} ({_pixel_count(width * height)}); {limit}, "
        f"resize it to at most {fit_width}x{fit_height}."
    )


def _pixel_count(pixels: int) -> str:
    """Megapixels with one decimal ("16.8 MP"), or plain pixels below 0.1 MP."""
    return f"{pixels / 1e6:.1f} MP" if pixels >= 100_000 else f"{pixels} pixels"


def _unidentified(data: bytes, what: str) -> UserError:
    """Tell a damaged file of an accepted format from a file that is no image we accept."""
    if _accepted_format(data) is not None:
        return _damaged(data, what)
    kind = _other_kind(data)
    if kind is None:
        return UserError(f"The {what} is not in an image format the bot reads; send a {ACCEPTED_TEXT} file.")
    hint = " (on an iPhone, set Settings > Camera > Formats to Most Compatible)" if kind == "a HEIC photo" else ""
    return UserError(f"The {what} is {kind}, not an image the bot reads; send a {ACCEPTED_TEXT} file{hint}.")


def _damaged(data: bytes, what: str) -> UserError:
    """The file claims an accepted format but its data is broken or cut short."""
    name = _accepted_format(data) or "image"
    return UserError(
        f"The {what} is a damaged or incomplete {name} file and cannot be read; "
        "open it in an image editor, save it again and resend it, or send a different file."
    )


def _accepted_format(data: bytes) -> str | None:
    """The accepted format whose magic bytes `data` starts with, if any."""
    for offset, magic, name in _SIGNATURES:
        if data[offset : offset + len(magic)] == magic and (offset == 0 or data.startswith(b"RIFF")):
            return name
    return None


def _other_kind(data: bytes) -> str | None:
    """Name common files that are not accepted images, for a more helpful message."""
    head = data[:1024]
    if head.startswith(b"%PDF"):
        return "a PDF document"
    if head.startswith(b"PK\x03\x04"):
        return "a ZIP archive"
    if head[4:8] == b"ftyp":
        if head[8:12] == b"avif":
            return "an AVIF image"
        if head[8:12] in _HEIF_BRANDS:
            return "a HEIC photo"
    if b"<svg" in head:
        return "an SVG drawing"
    try:
        text = codecs.getincrementaldecoder("utf-8")().decode(head, final=False)
    except UnicodeDecodeError:
        return None
    if all(char.isprintable() or char in "\t\r\n" for char in text):
        return "a text file"
    return None


def _file_sizes(size: int, limit: int) -> tuple[str, str]:
    """Format a file size and its limit in MB (10^6 bytes), or kB below 1 MB, with one decimal.

    The size is rounded up and the limit down, so the size never reads as equal to the limit.
    A trailing ".0" is dropped ("10 MB").
    """
    unit, name = (1_000_000, "MB") if limit >= 1_000_000 else (1_000, "kB")

    def show(tenths: int) -> str:
        return f"{tenths // 10} {name}" if tenths % 10 == 0 else f"{tenths / 10:.1f} {name}"

    return show(math.ceil(size * 10 / unit)), show(math.floor(limit * 10 / unit))


def _is_binary(value: object) -> bool:
    """Bytes-like values (an init image, a mask) stay out of the PNG text."""
    return isinstance(value, bytes | bytearray | memoryview)


def _a1111_text(parameters: Mapping[str, object]) -> str:
    """The AUTOMATIC1111 "parameters" block: prompt, negative prompt, then one settings line.

    Width and height become "Size: WxH" when both are present, and the scheduler is written with its
    A1111 sampler name ("Sampler: DPM++ 2M Karras"). Keys without a known label follow
    in sorted order as "Key name: value"; None values are left out, and values holding a comma,
    colon or newline are JSON-quoted as AUTOMATIC1111 does.
    """
    settings = dict(parameters)
    prompt = settings.pop("prompt", None)
    negative = settings.pop("negative_prompt", None)
    if "width" in settings and "height" in settings:
        settings["size"] = f"{settings.pop('width')}x{settings.pop('height')}"
    scheduler = settings.get("scheduler")
    if isinstance(scheduler, str):
        settings["scheduler"] = _A1111_SAMPLERS.get(scheduler, scheduler)
    labelled = [(label, settings.pop(key)) for key, label in _PARAMETER_LABELS.items() if key in settings]
    labelled += [(key.replace("_", " ").capitalize(), settings[key]) for key in sorted(settings)]
    lines = [] if prompt is None else [str(prompt)]
    if negative:
        lines.append(f"Negative prompt: {negative}")
    settings_line = ", ".join(f"{label}: {_a1111_value(value)}" for label, value in labelled if value is not None)
    if settings_line:
        lines.append(settings_line)
    return "\n".join(lines)


def _a1111_value(value: object) -> str:
    """Write a value as AUTOMATIC1111 does: plain, or JSON-quoted if it holds "," ":" or a newline."""
    text = value if isinstance(value, str) else json.dumps(value, ensure_ascii=False)
    if any(mark in text for mark in (",", ":", "\n")):
        return json.dumps(text, ensure_ascii=False)
    return text


def write_atomically(path: Path, data: bytes) -> None:
    """Write `data` to `path` so that readers see the whole file or none (temporary file, fsync, rename)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name[:12]}-", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as file:
            os.fchmod(file.fileno(), 0o644)
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(tmp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(tmp)
        raise
