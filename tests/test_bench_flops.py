"""bench/flops.py: the compute floors are counted for the shapes and tiles the engine runs."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent


def test_the_flop_counts_match_the_issues_reference_and_the_engines_tiling(tmp_path: Path) -> None:
    out = tmp_path / "flops.json"
    subprocess.run([sys.executable, "bench/flops.py", "--peak", "500", "--out", str(out)], cwd=ROOT, check=True)
    report = json.loads(out.read_text())
    sd = report["sd15 tflop"]
    assert sd["unet step, guided (2 rows)"] == pytest.approx(1.6, rel=0.05)  # the issue's "1.6 TFLOP" per step
    image = sd["one image (30 guided steps, decode, text)"]
    assert image > 30 * sd["unet step, guided (2 rows)"]
    floors = report["floor seconds at the peak"]
    assert floors["txt2img 512x512, one image"] == pytest.approx(image / 500, rel=1e-3)
    small, large = report["upscale tflop"]["128->512"], report["upscale tflop"]["512->2048"]
    assert (small["unet tiles"], small["vae tiles"]) == ("1 of 128", "1 of 128")
    assert (large["unet tiles"], large["vae tiles"]) == ("1 of 512", "4 of 288")  # [engine] upscale defaults
    assert large["vae decode"] < large["vae decode untiled"]  # the decoder's attention grows with the tile's square
    assert large["whole upscale"] > 10 * small["whole upscale"]
