"""The `easelbot` command line, driven in process on the tiny model set (64x64 or smaller, 2-3 steps)."""

from __future__ import annotations

import http.server
import io
import os
import socket
import subprocess
import sys
import threading
from collections.abc import Iterator
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from bot.cli import main
from engine.images import read_parameters

ROOT = Path(__file__).resolve().parents[2]


@pytest.fixture(autouse=True)
def _cli_env(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    """Run in a scratch folder, ignore any EASELBOT_CONFIG, and keep the CLI's env tweaks inside the test."""
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("EASELBOT_CONFIG", raising=False)
    for name in ("TRANSFORMERS_VERBOSITY", "DIFFUSERS_VERBOSITY", "HF_HUB_DISABLE_PROGRESS_BARS"):
        monkeypatch.setenv(name, "error" if name.endswith("VERBOSITY") else "1")


@pytest.fixture
def config(tmp_path: Path, tiny_root: Path) -> Path:
    """A config file that points every default at the tiny set and never goes online.

    min_side is lowered so that small test images (72x56) keep their own size.
    """
    path = tmp_path / "easelbot.toml"
    path.write_text(
        "[engine]\n"
        f"tiny_dir = {str(tiny_root)!r}\n"
        "offline = true\n"
        'default_model = "tiny"\n'
        'default_upscaler = "tiny"\n'
        "\n[limits]\n"
        "min_side = 32\n",
        encoding="utf-8",
    )
    return path


def _picture(path: Path, width: int, height: int, seed: int = 0) -> Path:
    rng = np.random.default_rng(seed)
    Image.fromarray(rng.integers(0, 256, size=(height, width, 3), dtype=np.uint8)).save(path)
    return path


def _run(capsys: pytest.CaptureFixture[str], *argv: str) -> tuple[int, str, str]:
    """Run `easelbot ARGV` in process; return (exit status, stdout, stderr)."""
    code = main(list(argv))
    out, err = capsys.readouterr()
    return code, out, err


def _image(path: Path) -> tuple[tuple[int, int], dict[str, object]]:
    data = path.read_bytes()
    with Image.open(io.BytesIO(data)) as image:
        assert image.format == "PNG"
        return image.size, read_parameters(data)


FAST = ("--steps", "2", "--scheduler", "euler")


# --- one-shot generation ----------------------------------------------------------------------


def test_imagine_writes_a_png_with_its_parameters(capsys: pytest.CaptureFixture[str], config: Path) -> None:
    """`imagine PROMPT -o out.png` writes a PNG of the asked size with prompt and seed embedded, exit 0."""
    code, out, err = _run(
        capsys,
        *("--config", str(config), "imagine", "a red fox", "-o", "out.png"),
        *("--steps", "2", "--width", "64", "--height", "64", "--seed", "5"),
    )
    assert code == 0, err
    assert out.split() == ["out.png"]
    size, parameters = _image(Path("out.png"))
    assert size == (64, 64)
    assert parameters["prompt"] == "a red fox"
    assert parameters["seed"] == 5
    assert parameters["task"] == "txt2img"
    assert parameters["steps"] == 2
    assert parameters["model"] == "tiny"


def test_imagine_count_writes_numbered_files(capsys: pytest.CaptureFixture[str], config: Path) -> None:
    """`-n 3` writes out-1.png .. out-3.png with consecutive seeds."""
    code, out, err = _run(
        capsys,
        *("--config", str(config), "imagine", "a red fox", "-o", "out.png", "-n", "3"),
        *("--width", "32", "--height", "32", "--seed", "10", *FAST),
    )
    assert code == 0, err
    names = ["out-1.png", "out-2.png", "out-3.png"]
    assert out.split() == names
    assert not Path("out.png").exists()
    seeds = [_image(Path(name))[1]["seed"] for name in names]
    assert seeds == [10, 11, 12]


def test_same_seed_gives_identical_bytes(capsys: pytest.CaptureFixture[str], config: Path) -> None:
    """Running the same command twice with the same seed writes byte-identical files."""
    common = ("--config", str(config), "imagine", "a red fox", "--width", "32", "--height", "32", "--seed", "7", *FAST)
    assert _run(capsys, *common, "-o", "first.png")[0] == 0
    assert _run(capsys, *common, "-o", "second.png")[0] == 0
    assert Path("first.png").read_bytes() == Path("second.png").read_bytes()


def test_random_seed_is_printed_to_stderr(capsys: pytest.CaptureFixture[str], config: Path) -> None:
    """Without --seed a random one is chosen and printed, and it is the one embedded in the PNG."""
    code, out, err = _run(
        capsys, "--config", str(config), "imagine", "a fox", "-o", "r.png", "--width", "32", "--height", "32", *FAST
    )
    assert code == 0, err
    assert out.split() == ["r.png"]
    printed = [line for line in err.splitlines() if line.startswith("seed: ")]
    assert len(printed) == 1
    assert _image(Path("r.png"))[1]["seed"] == int(printed[0].removeprefix("seed: "))


def test_edit_keeps_the_input_size(capsys: pytest.CaptureFixture[str], config: Path, tmp_path: Path) -> None:
    """`edit IMAGE PROMPT` runs img2img at the image's own size (72x56 in, 72x56 out)."""
    source = _picture(tmp_path / "in.png", 72, 56)
    code, _, err = _run(
        capsys, "--config", str(config), "edit", str(source), "a cat", "-o", "edit.png", "--seed", "1", *FAST
    )
    assert code == 0, err
    size, parameters = _image(Path("edit.png"))
    assert size == (72, 56)
    assert parameters["task"] == "img2img"
    assert parameters["prompt"] == "a cat"
    assert parameters["strength"] == 0.75


def test_edit_with_mask_runs_inpainting(capsys: pytest.CaptureFixture[str], config: Path, tmp_path: Path) -> None:
    """`edit IMAGE PROMPT --mask M` inpaints: the parameters say task inpaint."""
    source = _picture(tmp_path / "in.png", 64, 48)
    mask = Image.new("L", (64, 48), 0)
    mask.paste(255, (32, 0, 64, 48))
    mask.save(tmp_path / "mask.png")
    code, _, err = _run(
        capsys,
        *("--config", str(config), "edit", str(source), "a cat", "--mask", str(tmp_path / "mask.png")),
        *("-o", "inpaint.png", "--seed", "1", "--steps", "3", "--scheduler", "euler"),
    )
    assert code == 0, err
    size, parameters = _image(Path("inpaint.png"))
    assert size == (64, 48)
    assert parameters["task"] == "inpaint"


def test_upscale_compare_writes_x4_and_bicubic(
    capsys: pytest.CaptureFixture[str], config: Path, tmp_path: Path
) -> None:
    """`upscale IMAGE --compare` on 32x32 writes a 128x128 out.png and a 128x128 out-bicubic.png."""
    source = _picture(tmp_path / "small.png", 32, 32)
    code, out, err = _run(
        capsys, "--config", str(config), "upscale", str(source), "--compare", "-o", "out.png", "--steps", "2"
    )
    assert code == 0, err
    assert out.split() == ["out.png", "out-bicubic.png"]
    size, parameters = _image(Path("out.png"))
    assert size == (128, 128)
    assert parameters["task"] == "upscale"
    assert _image(Path("out-bicubic.png"))[0] == (128, 128)


def test_an_image_too_large_to_upscale_is_shrunk_to_the_limit_and_the_user_is_told(
    capsys: pytest.CaptureFixture[str], config: Path, tmp_path: Path
) -> None:
    """With max_upscale_side = 32, a 64x48 image is upscaled from 32x24 (its shape kept) to 128x96, and stderr
    says so; an image that fits gets no note, one whose side is no multiple of 8 a note saying so."""
    config.write_text(config.read_text(encoding="utf-8") + "max_upscale_side = 32\n", encoding="utf-8")
    source = _picture(tmp_path / "wide.png", 64, 48)
    code, _, err = _run(capsys, "--config", str(config), "upscale", str(source), "-o", "up.png", "--steps", "1")
    assert code == 0, err
    assert _image(Path("up.png"))[0] == (128, 96)
    assert "note: the image is 64x48, larger than [limits] max_upscale_side = 32; it is upscaled from 32x24 to " in err
    assert "128x96." in err
    fits = _picture(tmp_path / "fits.png", 32, 32)
    code, _, err = _run(capsys, "--config", str(config), "upscale", str(fits), "-o", "fit.png", "--steps", "1")
    assert code == 0, err
    assert "note:" not in err
    odd = _picture(tmp_path / "odd.png", 30, 32)
    code, _, err = _run(capsys, "--config", str(config), "upscale", str(odd), "-o", "odd.png", "--steps", "1")
    assert code == 0, err
    assert "note: the image is 30x32 (sides are multiples of 8); it is upscaled from 32x32 to 128x128." in err
    tiny = _picture(tmp_path / "tiny.png", 8, 8)
    code, _, err = _run(capsys, "--config", str(config), "upscale", str(tiny), "-o", "tiny.png", "--steps", "1")
    assert code == 0, err
    assert "note: the image is 8x8, smaller than the upscaler's 16 pixels a side; it is upscaled from 16x16" in err


# --- output files ------------------------------------------------------------------------------


@pytest.fixture
def no_generation(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if the engine is started: the error must come before any generation."""
    import engine.oneshot

    def run_once(*_: object) -> list[Path]:
        raise AssertionError("the engine ran")

    monkeypatch.setattr(engine.oneshot, "run_once", run_once)


TINY_FAST = ("--width", "32", "--height", "32", "--seed", "3", *FAST)


@pytest.mark.usefixtures("no_generation")
@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (("-o", "outdir"), "-o outdir is a folder; name a file in it, e.g. -o outdir/txt2img.png"),
        (("-o", "newdir/"), "-o newdir/ is a folder; name a file in it, e.g. -o newdir/txt2img.png"),
        (("-o", "afile/out.png"), "Cannot write afile/out.png: afile is a file, not a folder."),
        (("-o", "afile/sub/out.png"), "Cannot write afile/sub/out.png: afile is a file, not a folder."),
        (("-o", "/proc/nope/out.png"), "Cannot write /proc/nope/out.png: the folder /proc/nope cannot be created"),
        (("-o", "many.png", "-n", "3"), "Cannot write many-2.png: it is a folder."),
        (("-o", "out.jpg"), "-o out.jpg: the output is PNG"),
        (("-o", "out.webp"), "use a .png name, e.g. -o out.png"),
    ],
    ids=["folder", "folder-slash", "parent-is-file", "ancestor-is-file", "proc", "numbered-is-folder", "jpg", "webp"],
)
def test_bad_output_path_exits_2_before_generating(
    capsys: pytest.CaptureFixture[str], config: Path, argv: tuple[str, ...], expected: str
) -> None:
    """An -o that cannot be written (a folder, a parent that is a file or cannot be created, one of the numbered
    names taken by a folder) or is not a .png name is refused with one `error:` line and exit 2, before the
    engine runs and without creating anything."""
    Path("outdir").mkdir()
    Path("afile").write_bytes(b"")
    Path("many-2.png").mkdir()
    before = sorted(Path().rglob("*"))
    code, out, err = _run(capsys, "--config", str(config), "imagine", "a fox", *argv, *TINY_FAST)
    assert code == 2
    assert out == ""
    assert err.startswith("error: ")
    assert len(err.splitlines()) == 1, err
    assert expected in err
    assert "choose another -o" in err.lower() or "-o " in err
    assert sorted(Path().rglob("*")) == before


def test_output_without_extension_gets_png(capsys: pytest.CaptureFixture[str], config: Path) -> None:
    """`-o noext` writes noext.png (as `-n 2 -o noext` writes noext-1.png, noext-2.png), creating missing
    folders, and prints each path written; a .PNG name is kept as given."""
    code, out, err = _run(capsys, "--config", str(config), "imagine", "a fox", "-o", "noext", *TINY_FAST)
    assert code == 0, err
    assert out.split() == ["noext.png"]
    assert not Path("noext").exists()
    assert _image(Path("noext.png"))[1]["seed"] == 3
    code, out, err = _run(capsys, "--config", str(config), "imagine", "a fox", "-o", "noext", "-n", "2", *TINY_FAST)
    assert code == 0, err
    assert out.split() == ["noext-1.png", "noext-2.png"]
    code, out, err = _run(capsys, "--config", str(config), "imagine", "a fox", "-o", "new/sub/pic", *TINY_FAST)
    assert code == 0, err
    assert out.split() == ["new/sub/pic.png"]
    assert _image(Path("new/sub/pic.png"))[0] == (32, 32)
    code, out, err = _run(capsys, "--config", str(config), "imagine", "a fox", "-o", "LOUD.PNG", *TINY_FAST)
    assert code == 0, err
    assert out.split() == ["LOUD.PNG"]


def test_default_output_names_are_per_command_and_replace_old_files(
    capsys: pytest.CaptureFixture[str], config: Path, tmp_path: Path
) -> None:
    """Without -o: imagine writes txt2img.png, edit img2img.png (with --mask too), upscale upscale.png (and
    upscale-bicubic.png with --compare), in the current folder; a file already there is replaced."""
    Path("txt2img.png").write_bytes(b"an older file")
    code, out, err = _run(capsys, "--config", str(config), "imagine", "a fox", *TINY_FAST)
    assert code == 0, err
    assert out.split() == ["txt2img.png"]
    assert _image(Path("txt2img.png"))[0] == (32, 32)
    source = _picture(tmp_path / "in.png", 32, 32)
    mask = _picture(tmp_path / "mask.png", 32, 32)
    code, out, err = _run(capsys, "--config", str(config), "edit", str(source), "a cat", "--seed", "1", *FAST)
    assert code == 0, err
    assert out.split() == ["img2img.png"]
    Path("img2img.png").unlink()
    code, out, err = _run(
        capsys, "--config", str(config), "edit", str(source), "a cat", "--mask", str(mask), "--seed", "1", *FAST
    )
    assert code == 0, err
    assert out.split() == ["img2img.png"]
    assert _image(Path("img2img.png"))[1]["task"] == "inpaint"
    code, out, err = _run(capsys, "--config", str(config), "upscale", str(source), "--compare", "--steps", "1")
    assert code == 0, err
    assert out.split() == ["upscale.png", "upscale-bicubic.png"]


@pytest.mark.skipif(not Path("/dev/full").exists(), reason="needs /dev/full")
def test_a_failed_write_is_a_clean_error(capsys: pytest.CaptureFixture[str], config: Path) -> None:
    """A write that fails once the images are made (here a full disk: out.png links to /dev/full) exits 1 with one
    `error:` line naming the file, the reason and the seed to make the same images again, leaving no partial
    file."""
    Path("out.png").symlink_to("/dev/full")
    code, out, err = _run(capsys, "--config", str(config), "imagine", "a fox", "-o", "out.png", *TINY_FAST)
    assert code == 1
    assert out == ""
    last = err.splitlines()[-1]  # after any library chatter while the model loads
    assert last.startswith("error: Could not write out.png: No space left on device"), err
    assert "--seed 3" in last
    assert "Traceback" not in err
    assert not Path("out.png").is_symlink()


@pytest.mark.usefixtures("no_generation")
@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (
            ("upscale", "small.png", "--model", "sd15"),
            "Model `sd15` makes images from prompts; it cannot upscale. Choose one of: x4, tiny.",
        ),
        (
            ("imagine", "a fox", "--model", "x4"),
            "Model `x4` is an x4 upscaler; it cannot make images from prompts. Choose one of: sd15, tiny.",
        ),
        (("edit", "small.png", "a fox", "--model", "nosuch"), "Unknown model `nosuch`. Choose one of: sd15, tiny."),
    ],
    ids=["upscale-sd15", "imagine-x4", "edit-unknown"],
)
def test_wrong_model_is_refused_before_anything_is_printed(
    capsys: pytest.CaptureFixture[str], config: Path, argv: tuple[str, ...], expected: str
) -> None:
    """A model that is not configured, or of the wrong kind for the command, exits 2 with one `error:` line naming
    the models that would do, before the engine starts and before a random seed is printed."""
    _picture(Path("small.png"), 32, 32)
    code, out, err = _run(capsys, "--config", str(config), *argv)
    assert code == 2
    assert out == ""
    assert err.splitlines() == [err.strip()], "one line, no `seed:` before it"
    assert err.startswith(f"error: {expected}")


# --- bad input: exit 2 with the reason --------------------------------------------------------


@pytest.mark.parametrize(
    ("argv", "expected"),
    [
        (("imagine", ""), "The prompt is empty"),
        (("imagine", "a fox", "--width", "100"), "multiples of 8"),
        (("imagine", "a fox", "-n", "5"), "1 to 4 images"),
        (("imagine", "a fox", "--steps", "0"), "Steps must be between 1 and"),
        (("edit", "missing.png", "a fox"), "Cannot read the image file missing.png"),
        (("upscale", "missing.png"), "Cannot read the image file missing.png"),
    ],
    ids=["empty-prompt", "width-100", "count-5", "steps-0", "edit-missing-image", "upscale-missing-image"],
)
def test_bad_input_exits_2_with_a_clear_message(
    capsys: pytest.CaptureFixture[str], config: Path, argv: tuple[str, ...], expected: str
) -> None:
    """Invalid options or missing files exit 2 with `error: ...` on stderr and write nothing."""
    code, out, err = _run(capsys, "--config", str(config), *argv, "-o", "bad.png")
    assert code == 2
    assert err.startswith("error: ")
    assert expected in err
    assert "Traceback" not in err
    assert out == ""
    assert not Path("bad.png").exists()


def test_width_100_suggests_a_multiple_of_8(capsys: pytest.CaptureFixture[str], config: Path) -> None:
    """The size error says which size to use instead."""
    code, _, err = _run(capsys, "--config", str(config), "imagine", "a fox", "--width", "100", "--height", "64")
    assert code == 2
    assert "Try 96x64" in err or "Try 104x64" in err


def test_text_file_as_image_exits_2(capsys: pytest.CaptureFixture[str], config: Path, tmp_path: Path) -> None:
    """A text file passed as the image is refused as not an image, naming the accepted formats."""
    text = tmp_path / "notes.txt"
    text.write_text("hello, not a picture\n", encoding="utf-8")
    code, _, err = _run(capsys, "--config", str(config), "edit", str(text), "a fox", "-o", "bad.png")
    assert code == 2
    assert "text file" in err
    assert "PNG" in err
    assert not Path("bad.png").exists()


# --- models -----------------------------------------------------------------------------------


def test_models_make_tiny_writes_the_set(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """`models make-tiny DIR` builds the tiny model folders offline and prints where."""
    target = tmp_path / "tiny"
    code, out, err = _run(capsys, "models", "make-tiny", str(target))
    assert code == 0, err
    assert Path(out.strip()) == target
    for folder in ("txt2img", "inpaint", "upscaler"):
        assert (target / folder / "model_index.json").is_file()


def _rows(out: str) -> dict[str, str]:
    """The table of `models list` (up to its first blank line, without its header row), by model name."""
    table = out.split("\n\n", maxsplit=1)[0]
    header, *rows = table.splitlines()
    assert header.split() == ["MODEL", "KIND", "WEIGHTS", "SOURCE"]
    return {line.split()[0]: line for line in rows}


def _cached_repo(cache: Path, repo: str, *files: str) -> None:
    """Lay out `repo` in a Hugging Face cache folder as a download leaves it, with these (empty) files."""
    folder = cache / f"models--{repo.replace('/', '--')}"
    (folder / "refs").mkdir(parents=True)
    (folder / "refs" / "main").write_text("0123abcd", encoding="utf-8")
    for name in files:
        path = folder / "snapshots" / "0123abcd" / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(b"")


def test_models_list_shows_tiny_and_the_built_ins(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """`models list` lists the built-in tiny set and the configured sd15 and x4 with their kinds, and whether
    their weights are here: not yet, so each says how to get them."""
    path = tmp_path / "cache.toml"
    path.write_text(f"[engine]\ncache_dir = {str(tmp_path / 'hub')!r}\n", encoding="utf-8")
    code, out, _ = _run(capsys, "--config", str(path), "models", "list")
    assert code == 0
    rows = _rows(out)
    assert set(rows) == {"tiny", "sd15", "x4"}
    assert "stable-diffusion-v1-5/stable-diffusion-v1-5" in rows["sd15"]
    assert "upscaler" in rows["x4"]
    assert "built in" in rows["tiny"]
    assert "to fetch" in rows["sd15"]
    assert "sd15: not downloaded yet; the engine downloads it when first needed, or run " in out
    assert "`easelbot models download x4`" in out


def test_models_list_tells_downloaded_local_and_missing_weights_apart(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, tiny_root: Path
) -> None:
    """A repo in the cache with its UNet weights is downloaded, one with only its index is not; a local folder is
    local; with engine.offline a repo not in the cache is `not downloaded`; a checkpoint file or folder that does
    not exist is `missing`."""
    cache = tmp_path / "hub"
    _cached_repo(cache, "me/whole", "model_index.json", "unet/diffusion_pytorch_model.safetensors")
    _cached_repo(cache, "me/half", "model_index.json")
    _cached_repo(cache, "me/loras", "fast.safetensors")
    path = tmp_path / "models.toml"
    path.write_text(
        f"[engine]\noffline = true\ncache_dir = {str(cache)!r}\n"
        '[models.whole]\nsource = "me/whole"\n'
        '[models.fast]\nsource = "me/whole"\nlora = "me/loras"\nlora_file = "fast.safetensors"\n'
        '[models.slow]\nsource = "me/whole"\nlora = "me/loras"\nlora_file = "slow.safetensors"\n'
        '[models.half]\nsource = "me/half"\n'
        f"[models.here]\nsource = {str(tiny_root / 'txt2img')!r}\n"
        f"[models.file]\nsource = {str(tmp_path / 'gone.safetensors')!r}\n"
        f"[models.gone]\nsource = {str(tmp_path / 'no-such-folder')!r}\n",
        encoding="utf-8",
    )
    code, out, _ = _run(capsys, "--config", str(path), "models", "list")
    assert code == 0
    assert out.splitlines()[0].index("WEIGHTS") == 26  # the header names the columns where they are
    labels = {name: row[26:40].strip() for name, row in _rows(out).items()}  # the third column
    assert labels == {
        "tiny": "built in", "whole": "downloaded", "fast": "downloaded", "slow": "not downloaded",
        "half": "not downloaded", "here": "local", "file": "missing", "gone": "missing", "sd15": "not downloaded",
        "x4": "not downloaded",
    }  # fmt: skip
    assert "half: not downloaded, and engine.offline is set; run `easelbot models download half` once on a " in out
    assert "slow: the LoRA (me/loras) not downloaded, and engine.offline is set" in out
    assert f"file: the checkpoint file {tmp_path / 'gone.safetensors'} does not exist; fix models.file.source" in out
    assert f"gone: the weights: {tmp_path / 'no-such-folder'} is no folder here, nor a Hugging Face repo id; " in out
    assert "fix models.gone.source" in out
    assert "whole:" not in out


def test_models_list_includes_models_from_the_config(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """A [models.NAME] table in the config shows up next to the built-ins."""
    path = tmp_path / "models.toml"
    path.write_text(
        '[models.mine]\nsource = "me/mine"\n\n[models.fast]\nsource = "me/mine"\nlora = "me/fast-lora"\n',
        encoding="utf-8",
    )
    code, out, _ = _run(capsys, "--config", str(path), "models", "list")
    assert code == 0
    assert set(_rows(out)) == {"tiny", "sd15", "x4", "mine", "fast"}
    assert "me/mine + LoRA me/fast-lora" in out


def test_unreachable_model_says_how_to_get_it(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """An uncached model with offline = true exits 1 and says to download it or use --model tiny."""
    cache = tmp_path / "empty-cache"
    cache.mkdir()
    path = tmp_path / "offline.toml"
    path.write_text(f"[engine]\noffline = true\ncache_dir = {str(cache)!r}\n", encoding="utf-8")
    code, _, err = _run(
        capsys,
        *("--config", str(path), "imagine", "a fox", "--model", "sd15", "-o", "never.png"),
        *("--width", "64", "--height", "64", "--seed", "1", *FAST),
    )
    assert code == 1
    assert "easelbot models download sd15" in err
    assert "--model tiny" in err
    assert "Traceback" not in err
    assert not Path("never.png").exists()


def test_a_few_step_lora_model_runs_with_its_own_defaults(
    capsys: pytest.CaptureFixture[str], config: Path, tiny_root: Path, tmp_path: Path
) -> None:
    """`imagine --model fast` on a [models.fast] table with a LoRA and its own scheduler, steps and guidance:
    the image is made with those (read back from the PNG); an explicit --steps still wins."""
    import json

    from engine.tiny import make_lora

    unet = json.loads((tiny_root / "txt2img" / "unet" / "config.json").read_text())
    lora = make_lora(unet, tmp_path / "lora")
    with config.open("a", encoding="utf-8") as file:
        file.write(
            f"\n[models.fast]\nsource = {str(tiny_root / 'txt2img')!r}\nlora = {str(lora)!r}\n"
            'scheduler = "lcm"\nsteps = 4\nguidance = 1.0\n'
        )
    code, _, err = _run(
        capsys, "--config", str(config), "imagine", "a fox", "--model", "fast", "--width", "64", "--height", "64"
    )
    assert code == 0, err
    assert "LoRA keys" not in err, "a LoRA with no text-encoder part loads quietly"
    _, parameters = _image(Path("txt2img.png"))
    assert (parameters["model"], parameters["scheduler"], parameters["steps"]) == ("fast", "lcm", 4)
    assert parameters["guidance"] == 1.0
    code, _, err = _run(
        capsys, "--config", str(config), "imagine", "a fox", "--model", "fast", "--steps", "2", "-o", "two.png"
    )
    assert code == 0, err
    assert _image(Path("two.png"))[1]["steps"] == 2


def test_models_download_fetches_the_model_and_only_its_lora_file(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """`models download NAME` fetches the base weights and, from a repo of many LoRAs, only the named file."""
    import huggingface_hub

    calls: list[tuple[str, list[str]]] = []

    def snapshot_download(repo: str, *, allow_patterns: list[str], **_: object) -> str:
        calls.append((repo, allow_patterns))
        return f"/cache/{repo}"

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)
    path = tmp_path / "models.toml"
    path.write_text(
        '[models.fast]\nsource = "org/base"\nlora = "org/loras"\nlora_file = "eight-steps.safetensors"\n',
        encoding="utf-8",
    )
    code, out, err = _run(capsys, "--config", str(path), "models", "download", "fast")
    assert code == 0, err
    assert [repo for repo, _ in calls] == ["org/base", "org/loras"]
    assert "*.safetensors" in calls[0][1]
    assert calls[1][1] == ["eight-steps.safetensors"]
    assert out.split() == ["/cache/org/base", "/cache/org/loras"]


def test_models_list_has_a_header_row_over_aligned_columns(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """`models list` starts with a MODEL KIND WEIGHTS SOURCE header whose names sit over their columns, also when
    a model's name is longer than the usual column."""
    path = tmp_path / "long.toml"
    path.write_text(
        f'[engine]\ncache_dir = {str(tmp_path / "hub")!r}\n[models.a-rather-long-model-name]\nsource = "me/long"\n',
        encoding="utf-8",
    )
    code, out, _ = _run(capsys, "--config", str(path), "models", "list")
    assert code == 0
    header, *rows = out.split("\n\n", maxsplit=1)[0].splitlines()
    assert header.split() == ["MODEL", "KIND", "WEIGHTS", "SOURCE"]
    for column in ("KIND", "WEIGHTS", "SOURCE"):
        start = header.index(column)
        assert all(row[start - 1] == " " and row[start] != " " for row in rows), (column, rows)
    assert len(rows) == 4


@pytest.fixture
def no_hub(monkeypatch: pytest.MonkeyPatch) -> None:
    """Fail the test if `models download` calls the hub."""
    import huggingface_hub

    def snapshot_download(*_: object, **__: object) -> str:
        raise AssertionError("went to the hub")

    monkeypatch.setattr(huggingface_hub, "snapshot_download", snapshot_download)


@pytest.mark.usefixtures("no_hub")
def test_models_download_tiny_says_it_is_built_in(capsys: pytest.CaptureFixture[str], config: Path) -> None:
    """`models download tiny` exits 0 saying the tiny set is built in and needs no download, without the hub."""
    code, out, err = _run(capsys, "--config", str(config), "models", "download", "tiny")
    assert code == 0, err
    assert "built in" in out
    assert "nothing to download" in out


@pytest.mark.usefixtures("no_hub")
@pytest.mark.parametrize("name", ["nosuch", "no such/repo", "a/b/c"])
def test_models_download_of_an_unknown_name_lists_the_configured_models(
    capsys: pytest.CaptureFixture[str], config: Path, name: str
) -> None:
    """A name that is neither a configured model nor an owner/name repo id exits 2 with one line that says so and
    lists the configured models, without going to the hub."""
    code, out, err = _run(capsys, "--config", str(config), "models", "download", name)
    assert code == 2
    assert out == ""
    assert err.splitlines() == [
        f"error: `{name}` is neither a configured model nor a Hugging Face repo id (owner/name). "
        "Configured models: sd15, x4 (and `tiny`, built in, which needs no download)."
    ]


class _FakeHub(http.server.BaseHTTPRequestHandler):
    """Answers every request with the status and X-Error-Code the test sets on the server."""

    def do_GET(self) -> None:
        status, code = self.server.answer  # type: ignore[attr-defined]
        self.send_response(status)
        self.send_header("X-Error-Code", code)
        self.send_header("Content-Type", "application/json")
        self.end_headers()
        self.wfile.write(b'{"error": "fake"}')

    do_HEAD = do_GET

    def log_message(self, *_: object) -> None:
        pass


@pytest.fixture
def fake_hub() -> Iterator[http.server.ThreadingHTTPServer]:
    """A Hugging Face Hub stand-in on 127.0.0.1; set `.answer` to (status, X-Error-Code)."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _FakeHub)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()
    thread.join()


def _closed_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


@pytest.mark.parametrize(
    ("name", "hub", "expected"),
    [
        ("sd15", "refused", "Could not download stable-diffusion-v1-5/stable-diffusion-v1-5: cannot reach http://"),
        ("sd15", "offline", "offline mode is on (HF_HUB_OFFLINE or TRANSFORMERS_OFFLINE is set in the environment)"),
        ("me/gone", (404, "RepoNotFound"), "Could not download me/gone: the Hugging Face Hub has no such repo"),
        ("me/gated", (403, "GatedRepo"), "the repo is gated. Accept its terms at http://"),
        ("me/busy", (500, ""), "answered HTTP 500. Try again later."),
    ],
    ids=["refused", "offline", "not-found", "gated", "server-error"],
)
def test_models_download_failures_are_one_clean_line(
    tmp_path: Path,
    fake_hub: http.server.ThreadingHTTPServer,
    name: str,
    hub: str | tuple[int, str],
    expected: str,
) -> None:
    """A download the hub cannot serve (no connection, offline mode, no such repo, a gated one, a server error)
    exits 1 with one `error:` line saying why and what to do, not a traceback: run as a fresh process, since
    huggingface_hub reads HF_ENDPOINT and HF_HUB_OFFLINE once, when it is imported."""
    path = tmp_path / "hub.toml"
    path.write_text(f"[engine]\ncache_dir = {str(tmp_path / 'hub')!r}\n", encoding="utf-8")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "HF_HOME": str(tmp_path / "hf-home")}
    env.update(HF_HUB_OFFLINE="1" if hub == "offline" else "0", TRANSFORMERS_OFFLINE="0")
    port = _closed_port() if hub == "refused" else fake_hub.server_address[1]
    env["HF_ENDPOINT"] = f"http://127.0.0.1:{port}"
    for variable in ("EASELBOT_CONFIG", "HF_TOKEN", "HTTPS_PROXY", "HTTP_PROXY", "https_proxy", "http_proxy"):
        env.pop(variable, None)
    if isinstance(hub, tuple):
        fake_hub.answer = hub  # type: ignore[attr-defined]
    done = subprocess.run(
        [sys.executable, "-m", "bot.cli", "--config", str(path), "models", "download", name],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        cwd=tmp_path,
        env=env,
    )
    assert done.returncode == 1, done.stderr
    assert done.stdout == ""
    assert len(done.stderr.splitlines()) == 1, done.stderr
    assert done.stderr.startswith("error: Could not download ")
    assert expected in done.stderr


# --- config check -----------------------------------------------------------------------------


def test_config_check_accepts_a_good_file(capsys: pytest.CaptureFixture[str], config: Path) -> None:
    """`config check FILE` prints OK and exits 0 for a valid file."""
    code, out, _ = _run(capsys, "config", "check", str(config))
    assert code == 0
    assert "OK" in out
    assert str(config) in out


def test_config_check_says_which_secrets_and_models_run_still_needs(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A valid file whose adapters need tokens that are not set, a web host without API keys and models that are
    not downloaded with engine.offline: `config check` still exits 0 (the file is fine) and lists each thing
    `easelbot run` lacks, saying what to do; once they are there it says the machine is ready, printing no
    secret."""
    for name in ("DISCORD_TOKEN", "SLACK_BOT_TOKEN", "SLACK_SIGNING_SECRET", "SLACK_APP_TOKEN", "EASELBOT_API_KEYS"):
        monkeypatch.delenv(name, raising=False)
    cache = tmp_path / "hub"
    path = tmp_path / "prod.toml"
    path.write_text(
        f'[engine]\noffline = true\ncache_dir = {str(cache)!r}\n[web]\nhost = "0.0.0.0"\n'
        '[discord]\nenabled = true\n[slack]\nenabled = true\nmode = "http"\n',
        encoding="utf-8",
    )
    code, out, _ = _run(capsys, "config", "check", str(path))
    assert code == 0
    problems = [line.split(None, 1)[1] for line in out.splitlines() if line.strip().startswith("problem")]
    assert [p.split(":")[0] for p in problems] == ["discord", "slack", "slack", "web", "model sd15", "model x4"]
    assert "DISCORD_TOKEN is not set ([discord] enabled = true)" in problems[0]
    assert "SLACK_BOT_TOKEN" in problems[1]
    assert "SLACK_SIGNING_SECRET is not set ([slack] mode = http)" in problems[2]
    assert "set EASELBOT_API_KEYS" in problems[3]
    assert "run `easelbot models download sd15` once on a machine with network access" in problems[4]
    monkeypatch.setenv("DISCORD_TOKEN", "discord-secret-1")
    monkeypatch.setenv("SLACK_BOT_TOKEN", "xoxb-secret-2")
    monkeypatch.setenv("SLACK_SIGNING_SECRET", "signing-secret-3")
    monkeypatch.setenv("EASELBOT_API_KEYS", "key-secret-4")
    for repo in ("stable-diffusion-v1-5/stable-diffusion-v1-5", "stabilityai/stable-diffusion-x4-upscaler"):
        _cached_repo(cache, repo, "model_index.json", "unet/diffusion_pytorch_model.safetensors")
    code, out, err = _run(capsys, "config", "check", str(path))
    assert code == 0
    assert "This machine is ready for `easelbot run`" in out
    for value in ("discord-secret-1", "xoxb-secret-2", "signing-secret-3", "key-secret-4"):
        assert value not in out + err


def test_config_check_names_the_safety_checker_setting_to_fix(
    capsys: pytest.CaptureFixture[str], tmp_path: Path
) -> None:
    """A safety checker source that is neither a folder here nor a repo id is a problem (even where the engine
    may download) naming engine.safety.source, the key to fix."""
    path = tmp_path / "safety.toml"
    gone = tmp_path / "no-checker"
    path.write_text(
        f"[engine]\ncache_dir = {str(tmp_path / 'hub')!r}\n[engine.safety]\nenabled = true\nsource = {str(gone)!r}\n",
        encoding="utf-8",
    )
    code, out, _ = _run(capsys, "config", "check", str(path))
    assert code == 0
    assert f"problem  safety checker: the safety checker: {gone} is no folder here, nor a Hugging Face repo id; " in out
    assert "fix engine.safety.source" in out


def test_config_check_in_redis_mode_needs_the_url_not_the_models(
    capsys: pytest.CaptureFixture[str], tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """With [redis] enabled the models load on the workers, so only the Redis URL is asked for; models that the
    engine would fetch itself are notes, never problems."""
    monkeypatch.delenv("EASELBOT_REDIS_URL", raising=False)
    path = tmp_path / "redis.toml"
    path.write_text(f"[engine]\ncache_dir = {str(tmp_path / 'hub')!r}\n[redis]\nenabled = true\n", encoding="utf-8")
    code, out, _ = _run(capsys, "config", "check", str(path))
    assert code == 0
    assert "problem  redis: EASELBOT_REDIS_URL is not set" in out
    assert "model" not in out.split("Before", 1)[1]
    monkeypatch.setenv("EASELBOT_REDIS_URL", "redis://:ab/cd@127.0.0.1:16399/0")  # a `/` `run` would refuse
    code, out, _ = _run(capsys, "config", "check", str(path))
    assert "problem  redis: EASELBOT_REDIS_URL = 'redis://:***@127.0.0.1:16399/0'" in out
    assert "must be percent-encoded" in out
    assert "ab/cd" not in out
    monkeypatch.delenv("EASELBOT_REDIS_URL")
    path.write_text(f"[engine]\ncache_dir = {str(tmp_path / 'hub')!r}\n", encoding="utf-8")
    code, out, _ = _run(capsys, "config", "check", str(path))
    assert "problem" not in out
    assert "note     model sd15: not downloaded yet; the engine downloads it when first needed" in out


def test_config_check_uses_the_config_option(capsys: pytest.CaptureFixture[str], config: Path) -> None:
    """Without FILE, `config check` checks the --config file."""
    code, out, _ = _run(capsys, "--config", str(config), "config", "check")
    assert code == 0
    assert "OK" in out


def test_config_check_rejects_a_bad_file(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """`config check` on a file with an unknown key exits 1 and names the file and the key."""
    bad = tmp_path / "bad.toml"
    bad.write_text("[engine]\ndefault_modle = 'tiny'\n", encoding="utf-8")
    code, out, err = _run(capsys, "config", "check", str(bad))
    assert code == 1
    assert out == ""
    assert "default_modle" in err
    assert str(bad) in err


def test_config_check_without_any_file_says_how_to_name_one(capsys: pytest.CaptureFixture[str]) -> None:
    """`config check` with no FILE and no --config exits 1 and explains the usage."""
    code, _, err = _run(capsys, "config", "check")
    assert code == 1
    assert "easelbot config check FILE" in err


def test_bad_config_stops_generation_before_any_work(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    """A one-shot command with an invalid config exits 1 naming the key, writing nothing."""
    bad = tmp_path / "bad.toml"
    bad.write_text("[limits]\nmax_stesp = 10\n", encoding="utf-8")
    code, _, err = _run(capsys, "--config", str(bad), "imagine", "a fox", "-o", "x.png")
    assert code == 1
    assert "max_stesp" in err
    assert not Path("x.png").exists()


def test_output_piped_into_a_reader_that_stops_early_is_not_an_error() -> None:
    """`easelbot config check FILE | head -1`: the reader has gone before the output is written; the command exits
    0 without a BrokenPipeError traceback."""
    root = Path(__file__).resolve().parents[2]
    read, write = os.pipe()
    os.close(read)
    try:
        done = subprocess.run(
            [sys.executable, "-m", "bot.cli", "config", "check", str(root / "config.example.toml")],
            stdout=write, stderr=subprocess.PIPE, cwd=root, timeout=120, check=False,
        )  # fmt: skip
    finally:
        os.close(write)
    assert done.returncode == 0
    assert b"Traceback" not in done.stderr
