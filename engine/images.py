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
import itertools
import json
import math
import os
import struct
import tempfile
import threading
import zlib
from collections.abc import Mapping
from concurrent.futures import ThreadPoolExecutor
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
    "strength": "Denoising strength",
}
"""AUTOMATIC1111 labels, in the order they are written; "size" stands for width and height."""

_A1111_SAMPLERS = {**SCHEDULERS, "pndm": "PLMS", "lcm": "LCM"}
"""Our scheduler names -> the sampler names AUTOMATIC1111 writes (and its infotext parser, civitai and
SD Prompt Reader read); a name not listed is written as it is."""

PARALLEL_PNG_PIXELS = 1_000_000
"""`encode_png` writes images of at least this many pixels itself, deflating bands of rows on several
threads (`_write_png`); smaller images go through Pillow's single-threaded encoder."""


def usable_cores() -> int:
    """The CPU cores this process may run on (its affinity, which a container's cpuset limits), at least 1."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return os.cpu_count() or 1


PNG_THREADS = min(8, usable_cores())
"""How many bands of rows `encode_png` splits a large image into, and how many threads deflate the bands of
every large image being encoded (one shared pool, so images encoded side by side do not multiply them)."""

_BAND_POOL: list[ThreadPoolExecutor] = []
_BAND_POOL_LOCK = threading.Lock()

_PNG_LAYOUTS = {"L": (0, 1), "LA": (4, 2), "RGB": (2, 3), "RGBA": (6, 4)}
"""Pillow mode -> (PNG colour type, bytes per pixel) of the 8-bit modes `_write_png` writes."""

_PILLOW_ONLY_INFO = ("icc_profile", "transparency")
"""``image.info`` keys that Pillow's PNG encoder turns into chunks; images carrying one go to Pillow."""

_FILTER_ROWS = 32
"""Rows filtered and deflated at a time within a band: the five candidate filters stay in cache."""

_IDAT_BYTES = 1 << 20
"""The most deflated bytes one IDAT chunk holds."""

_PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"
"""The eight bytes every PNG file starts with."""


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

    Strokes too thin to survive that (a 2-pixel line on a large mask averages below 128) are kept instead:
    every 8x8 block of `size` (one latent pixel, what the pipeline's mask is sampled to) that any white pixel
    of the mask falls in is repainted whole.

    Raises `UserError` if no pixel of the mask reaches 128, since nothing would be repainted.
    An all-white mask is valid and repaints everything.
    """
    if mask.mode.startswith("I") or mask.mode == "F":
        mask = _scale_to_8bit(mask)
    if mask.has_transparency_data:
        black = Image.new("RGBA", mask.size, (0, 0, 0, 255))
        mask = Image.alpha_composite(black, mask.convert("RGBA"))
    original = mask.convert("L")
    _, brightest = cast("tuple[int, int]", original.getextrema())
    if brightest < 128:
        raise UserError("The mask is all black, so nothing would be repainted. Paint the areas to change in white.")
    gray = original.resize(size, Image.Resampling.BILINEAR) if original.size != size else original
    if cast("tuple[int, int]", gray.getextrema())[1] < 128:  # only thin strokes, averaged away
        painted = original.point(lambda value: 255 if value >= 128 else 0)
        latent = (max(1, size[0] // 8), max(1, size[1] // 8))
        blocks = painted.resize(latent, Image.Resampling.BOX).point(lambda value: 255 if value > 0 else 0)
        gray = blocks.resize(size, Image.Resampling.NEAREST)
    return gray


def encode_png(
    image: Image.Image,
    *,
    parameters: Mapping[str, object] | None = None,
    compress_level: int = 4,
    threads: int = PNG_THREADS,
) -> bytes:
    """Encode `image` as PNG, with `parameters` in two iTXt chunks when given.

    ``easelbot`` holds compact JSON with sorted keys (read back by `read_parameters`);
    ``parameters`` holds the AUTOMATIC1111 text that other tools show (`_a1111_text`). Values that
    are bytes are left out of both; any other value JSON cannot encode raises `TypeError`.

    Images of at least `PARALLEL_PNG_PIXELS` in mode L, LA, RGB or RGBA are written by `_write_png`,
    which splits them into `threads` bands of rows deflated side by side; the file has the same
    chunks as Pillow would write, with other pixel data bytes. Other images are saved by Pillow.
    """
    if threads < 1:
        raise ValueError(f"threads must be at least 1, not {threads}.")
    texts = _text_chunks(parameters) if parameters else []
    if _writes_itself(image):
        return _write_png(image, texts, compress_level=compress_level, bands=threads)
    info = PngImagePlugin.PngInfo()
    for keyword, text in texts:
        info.add_itxt(keyword, text)
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


def _text_chunks(parameters: Mapping[str, object]) -> list[tuple[str, str]]:
    """The (keyword, text) of the iTXt chunks `encode_png` writes, in order: easelbot JSON, then A1111 text."""
    kept = {key: value for key, value in parameters.items() if not _is_binary(value)}
    return [
        ("easelbot", json.dumps(kept, sort_keys=True, separators=(",", ":"), ensure_ascii=False)),
        ("parameters", _a1111_text(kept)),
    ]


def _writes_itself(image: Image.Image) -> bool:
    """Whether `encode_png` writes `image` with `_write_png` rather than Pillow."""
    return (
        image.width * image.height >= PARALLEL_PNG_PIXELS
        and image.mode in _PNG_LAYOUTS
        and not any(key in image.info for key in _PILLOW_ONLY_INFO)
    )


def _write_png(image: Image.Image, texts: list[tuple[str, str]], *, compress_level: int, bands: int) -> bytes:
    """Write an 8-bit L, LA, RGB or RGBA image as PNG, deflating `bands` bands of rows on the band threads.

    The chunks are those Pillow writes for the image: IHDR, the uncompressed iTXt chunks of `texts`,
    the pixel data in IDAT chunks, IEND. Rows are filtered per row (`_filter_rows`) and deflated
    with zlib's Z_FILTERED strategy, which at level 4 gives files within a few percent of Pillow's,
    smaller or larger depending on the image (bench/png.py). Each band is a raw deflate stream that
    ends on a byte boundary (a sync flush) except the last, so their concatenation, between the zlib
    header and the Adler-32 of all filtered rows, is one zlib stream. Bands start with an empty
    dictionary, which costs a few hundred bytes each.
    """
    colour_type, pixel_bytes = _PNG_LAYOUTS[image.mode]
    rows = np.asarray(image).reshape(image.height, image.width * pixel_bytes)
    bands = min(bands, image.height)
    bounds = [image.height * k // bands for k in range(bands + 1)]
    spans = [(top, bottom, bottom == image.height) for top, bottom in itertools.pairwise(bounds)]

    def deflate(span: tuple[int, int, bool]) -> tuple[bytes, bytes]:
        top, bottom, last = span
        return _deflate_band(rows, top, bottom, pixel_bytes, compress_level=compress_level, last=last)

    parts = [_zlib_header(compress_level)]
    checksum = zlib.adler32(b"")
    for filtered, deflated in _band_pool().map(deflate, spans):
        checksum = zlib.adler32(filtered, checksum)
        parts.append(deflated)
    parts.append(struct.pack(">I", checksum))
    stream = memoryview(b"".join(parts))

    header = struct.pack(">IIBBBBB", image.width, image.height, 8, colour_type, 0, 0, 0)
    chunks = [_png_chunk(b"IHDR", header)]
    chunks += [
        _png_chunk(b"iTXt", keyword.encode("latin-1") + b"\0\0\0\0\0" + text.encode()) for keyword, text in texts
    ]
    chunks += [_png_chunk(b"IDAT", stream[start : start + _IDAT_BYTES]) for start in range(0, len(stream), _IDAT_BYTES)]
    chunks.append(_png_chunk(b"IEND", b""))
    return _PNG_SIGNATURE + b"".join(chunks)


def _band_pool() -> ThreadPoolExecutor:
    """The `PNG_THREADS` threads that deflate bands, started on first use and shared by every encode."""
    with _BAND_POOL_LOCK:
        if not _BAND_POOL:
            _BAND_POOL.append(ThreadPoolExecutor(max_workers=PNG_THREADS, thread_name_prefix="png-band"))
        return _BAND_POOL[0]


def _deflate_band(
    rows: np.ndarray, top: int, bottom: int, pixel_bytes: int, *, compress_level: int, last: bool
) -> tuple[bytes, bytes]:
    """Filter rows `top` to `bottom` and raw-deflate them; return the filtered and the deflated bytes.

    The band's first row is filtered against the image row above it, as in a single stream. The
    deflate stream ends with a sync flush, or is finished when the band is the `last`.
    """
    compressor = zlib.compressobj(compress_level, zlib.DEFLATED, -zlib.MAX_WBITS, 9, zlib.Z_FILTERED)
    filtered: list[bytes] = []
    deflated: list[bytes] = []
    for start in range(top, bottom, _FILTER_ROWS):
        stop = min(start + _FILTER_ROWS, bottom)
        above = rows[start - 1 : stop - 1] if start else np.vstack([np.zeros_like(rows[:1]), rows[: stop - 1]])
        block = _filter_rows(rows[start:stop], above, pixel_bytes).tobytes()
        filtered.append(block)
        deflated.append(compressor.compress(block))
    deflated.append(compressor.flush(zlib.Z_FINISH if last else zlib.Z_SYNC_FLUSH))
    return b"".join(filtered), b"".join(deflated)


def _filter_rows(rows: np.ndarray, above: np.ndarray, pixel_bytes: int) -> np.ndarray:
    """PNG-filter each row against the row `above` it, each with its filter-type byte in front.

    Each row gets whichever of the five filters (None, Sub, Up, Average, Paeth) leaves the smallest
    sum of absolute values, reading the filtered bytes as signed: the heuristic the PNG
    specification suggests, and the first filter on a tie.
    """
    count, width = rows.shape
    left = np.zeros_like(rows)
    left[:, pixel_bytes:] = rows[:, :-pixel_bytes]
    upper_left = np.zeros_like(above)
    upper_left[:, pixel_bytes:] = above[:, :-pixel_bytes]
    candidates = np.empty((5, count, width), np.uint8)
    candidates[0] = rows
    np.subtract(rows, left, out=candidates[1])
    np.subtract(rows, above, out=candidates[2])
    np.subtract(rows, ((left.astype(np.uint16) + above) >> 1).astype(np.uint8), out=candidates[3])
    np.subtract(rows, _paeth_predictor(left, above, upper_left), out=candidates[4])
    costs = np.minimum(candidates, 0 - candidates).sum(axis=2, dtype=np.uint32)
    best = costs.argmin(axis=0)
    filtered = np.empty((count, 1 + width), np.uint8)
    filtered[:, 0] = best
    filtered[:, 1:] = candidates[best, np.arange(count)]
    return filtered


def _paeth_predictor(left: np.ndarray, above: np.ndarray, upper_left: np.ndarray) -> np.ndarray:
    """The PNG Paeth predictor: whichever of left, above and upper left is nearest left + above - upper left."""
    to_left = np.abs(above.astype(np.int16) - upper_left)
    to_above = np.abs(left.astype(np.int16) - upper_left)
    to_upper_left = np.abs(left.astype(np.int16) + above - 2 * upper_left.astype(np.int16))
    predictor = np.where(to_above <= to_upper_left, above, upper_left)
    return np.where((to_left <= to_above) & (to_left <= to_upper_left), left, predictor)


def _zlib_header(compress_level: int) -> bytes:
    """The two bytes that open a zlib stream: deflate with a 32 KiB window, and the level's class."""
    speed = 0 if 0 <= compress_level < 2 else 1 if 2 <= compress_level < 6 else 2 if compress_level in (-1, 6) else 3
    method = 0x78
    flags = speed << 6
    return bytes((method, flags + (31 - (method * 256 + flags) % 31) % 31))


def _png_chunk(kind: bytes, body: bytes | memoryview) -> bytes:
    """One PNG chunk: length, type, body and the CRC-32 of type and body."""
    return struct.pack(">I", len(body)) + kind + body + struct.pack(">I", zlib.crc32(body, zlib.crc32(kind)))


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
