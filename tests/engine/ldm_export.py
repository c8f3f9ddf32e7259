"""Write a diffusers Stable Diffusion folder as one original-layout ("ldm") `.safetensors` checkpoint.

This is the layout of the single-file models people download from model sites: one file holding
the UNet under `model.diffusion_model.`, the VAE under `first_stage_model.` and the CLIP text
encoder under `cond_stage_model.transformer.text_model.`, with CompVis's module names. Tests use
it to build such a file from the tiny model set, so the single-file loading path of
engine/models.py can be checked offline against the equivalent diffusers folder.

The key mapping is the inverse of what diffusers' `from_single_file` converters undo; block
indices are derived from the folder's own unet/vae configs, so any SD1-style block structure works.
Every tensor is renamed exactly once and copied bit for bit; a key this module cannot place is an
error rather than a silently dropped weight.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_file, save_file

UNET_PREFIX = "model.diffusion_model."
VAE_PREFIX = "first_stage_model."
CLIP_PREFIX = "cond_stage_model.transformer."

_UNET_RESNET = {
    "norm1": "in_layers.0",
    "conv1": "in_layers.2",
    "time_emb_proj": "emb_layers.1",
    "norm2": "out_layers.0",
    "conv2": "out_layers.3",
    "conv_shortcut": "skip_connection",
}
_VAE_RESNET = {"conv_shortcut": "nin_shortcut"}
_VAE_ATTENTION = {"group_norm": "norm", "to_q": "q", "to_k": "k", "to_v": "v", "to_out.0": "proj_out"}


def export_single_file(pipeline_dir: Path, out: Path) -> Path:
    """Write the unet, vae and text_encoder of the diffusers folder `pipeline_dir` as one ldm checkpoint `out`."""
    pipeline_dir = Path(pipeline_dir)
    state: dict[str, torch.Tensor] = {}
    unet_config = _config(pipeline_dir / "unet")
    vae_config = _config(pipeline_dir / "vae")
    for prefix, weights in (
        (UNET_PREFIX, _rename(_weights(pipeline_dir / "unet"), _unet_prefixes(unet_config), "unet")),
        (VAE_PREFIX, _rename(_weights(pipeline_dir / "vae"), _vae_prefixes(vae_config), "vae")),
        (CLIP_PREFIX, _clip(_weights(pipeline_dir / "text_encoder"))),
    ):
        for key, tensor in weights.items():
            state[prefix + key] = tensor.contiguous()
    out = Path(out)
    out.parent.mkdir(parents=True, exist_ok=True)
    save_file(state, str(out), metadata={"format": "pt"})
    return out


def _config(folder: Path) -> dict[str, Any]:
    config: dict[str, Any] = json.loads((folder / "config.json").read_text())
    return config


def _weights(folder: Path) -> dict[str, torch.Tensor]:
    """Every tensor of a component folder (one file or shards); pickled weights are not read."""
    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no .safetensors weights in {folder}")
    state: dict[str, torch.Tensor] = {}
    for file in files:
        state.update(load_file(str(file)))
    return state


def _unet_prefixes(config: dict[str, Any]) -> dict[str, tuple[str, dict[str, str]]]:
    """diffusers UNet module prefix -> (ldm prefix, renames of the first name after it).

    ldm numbers the encoder as a flat list `input_blocks` (conv_in first, then per level
    `layers_per_block` resnet(+attention) entries and a downsampler except on the last level) and
    the decoder as `output_blocks` (`layers_per_block + 1` entries per level, the upsampler riding
    on the level's last entry after its resnet and optional attention).
    """
    layers = config["layers_per_block"]
    if not isinstance(layers, int):
        raise ValueError(f"per-level layers_per_block {layers!r} has no ldm layout")
    down, up = config["down_block_types"], config["up_block_types"]
    if config.get("mid_block_type", "UNetMidBlock2DCrossAttn") != "UNetMidBlock2DCrossAttn":
        raise ValueError(f"mid block {config['mid_block_type']!r} has no ldm layout here")
    prefixes: dict[str, tuple[str, dict[str, str]]] = {}
    index = 1
    for level in range(len(down)):
        for layer in range(layers):
            prefixes[f"down_blocks.{level}.resnets.{layer}."] = (f"input_blocks.{index}.0.", _UNET_RESNET)
            prefixes[f"down_blocks.{level}.attentions.{layer}."] = (f"input_blocks.{index}.1.", {})
            index += 1
        if level < len(down) - 1:
            prefixes[f"down_blocks.{level}.downsamplers.0.conv."] = (f"input_blocks.{index}.0.op.", {})
            index += 1
    prefixes["mid_block.resnets.0."] = ("middle_block.0.", _UNET_RESNET)
    prefixes["mid_block.attentions.0."] = ("middle_block.1.", {})
    prefixes["mid_block.resnets.1."] = ("middle_block.2.", _UNET_RESNET)
    index = 0
    for level, block_type in enumerate(up):
        has_attention = "CrossAttn" in block_type
        for layer in range(layers + 1):
            prefixes[f"up_blocks.{level}.resnets.{layer}."] = (f"output_blocks.{index}.0.", _UNET_RESNET)
            prefixes[f"up_blocks.{level}.attentions.{layer}."] = (f"output_blocks.{index}.1.", {})
            if layer == layers and level < len(up) - 1:
                slot = 2 if has_attention else 1
                prefixes[f"up_blocks.{level}.upsamplers.0.conv."] = (f"output_blocks.{index}.{slot}.conv.", {})
            index += 1
    top = {
        "time_embedding.linear_1.": "time_embed.0.",
        "time_embedding.linear_2.": "time_embed.2.",
        "conv_in.": "input_blocks.0.0.",
        "conv_norm_out.": "out.0.",
        "conv_out.": "out.2.",
    }
    prefixes.update({key: (value, {}) for key, value in top.items()})
    return prefixes


def _vae_prefixes(config: dict[str, Any]) -> dict[str, tuple[str, dict[str, str]]]:
    """diffusers AutoencoderKL module prefix -> (ldm prefix, renames); ldm numbers decoder levels bottom-up."""
    down, up = len(config["down_block_types"]), len(config["up_block_types"])
    prefixes: dict[str, tuple[str, dict[str, str]]] = {}
    for level in range(down):
        prefixes[f"encoder.down_blocks.{level}.resnets."] = (f"encoder.down.{level}.block.", _VAE_RESNET)
        if level < down - 1:
            prefixes[f"encoder.down_blocks.{level}.downsamplers.0.conv."] = (
                f"encoder.down.{level}.downsample.conv.",
                {},
            )
    for level in range(up):
        ldm_level = up - 1 - level
        prefixes[f"decoder.up_blocks.{level}.resnets."] = (f"decoder.up.{ldm_level}.block.", _VAE_RESNET)
        if level < up - 1:
            prefixes[f"decoder.up_blocks.{level}.upsamplers.0.conv."] = (f"decoder.up.{ldm_level}.upsample.conv.", {})
    for side in ("encoder", "decoder"):
        prefixes[f"{side}.mid_block.resnets.0."] = (f"{side}.mid.block_1.", _VAE_RESNET)
        prefixes[f"{side}.mid_block.resnets.1."] = (f"{side}.mid.block_2.", _VAE_RESNET)
        prefixes[f"{side}.mid_block.attentions.0."] = (f"{side}.mid.attn_1.", _VAE_ATTENTION)
        prefixes[f"{side}.conv_norm_out."] = (f"{side}.norm_out.", {})
        for same in ("conv_in.", "conv_out."):
            prefixes[f"{side}.{same}"] = (f"{side}.{same}", {})
    for same in ("quant_conv.", "post_quant_conv."):
        prefixes[same] = (same, {})
    return prefixes


def _rename(
    state: dict[str, torch.Tensor], prefixes: dict[str, tuple[str, dict[str, str]]], what: str
) -> dict[str, torch.Tensor]:
    """Rename every key by its longest matching prefix; a key with no match is an error."""
    ordered = sorted(prefixes, key=len, reverse=True)
    renamed: dict[str, torch.Tensor] = {}
    unplaced = []
    for key, tensor in state.items():
        prefix = next((p for p in ordered if key.startswith(p)), None)
        if prefix is None:
            unplaced.append(key)
            continue
        ldm_prefix, names = prefixes[prefix]
        rest = key[len(prefix) :]
        for old in sorted(names, key=len, reverse=True):
            if rest.startswith(old + "."):
                rest = names[old] + rest[len(old) :]
                if names is _VAE_ATTENTION and rest.endswith(".weight") and tensor.ndim == 2:
                    tensor = tensor[:, :, None, None]  # linear in diffusers, 1x1 conv in ldm
                break
        new = ldm_prefix + rest
        if new in renamed:
            raise ValueError(f"{what}: two weights map to {new}")
        renamed[new] = tensor
    if unplaced:
        raise ValueError(f"{what}: no ldm name for {sorted(unplaced)}")
    return renamed


def _clip(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    """CLIPTextModel keys under `text_model.` (transformers >= 5.6 saves them without that level)."""
    return {key if key.startswith("text_model.") else f"text_model.{key}": tensor for key, tensor in state.items()}
