"""Network presets: the official LCTfound U-Net and CPU-practical variants of it.

Every preset is a diffusers `UNet2DConditionModel` with the official family traits: five
resolution levels, two ResNets per down block (three per up block), cross-attention on a
768-d prompt vector projected by ``encoder_hid_proj`` (``encoder_hid_dim_type="text_proj"``),
ε-prediction on 3-channel [-1, 1] images. Feature hooks sit on up blocks 1–4 in all presets,
so the feature recipe, heads and tasks work unchanged on any of them.

Why the CPU presets differ where they do (measured, see benchmarks/RESULTS.md): the official
model spends most of its ≈37 s per 256² forward (2 CPU threads) in self-attention at 1/2 and
1/4 resolution (16,384 and 4,096 tokens). Keeping attention only at 1/8 resolution (and in the
mid block) and narrowing the widths brings a forward to a fraction of a second while the
prompt still reaches the network through the remaining cross-attention blocks.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

from ..errors import LCTfoundError

DOWN, CROSS_DOWN = "DownBlock2D", "CrossAttnDownBlock2D"
UP, CROSS_UP = "UpBlock2D", "CrossAttnUpBlock2D"

#: Exactly the constructor arguments of the official code (reference §2.1); everything else
#: is the diffusers default, which `OFFICIAL_DEFAULTS` pins so that a future diffusers
#: release with other defaults cannot silently change the network.
OFFICIAL_UNET_CONFIG: dict[str, Any] = {
    "sample_size": 256,
    "in_channels": 3,
    "out_channels": 3,
    "layers_per_block": 2,
    "block_out_channels": (64, 128, 256, 512, 1024),
    "down_block_types": (DOWN, CROSS_DOWN, CROSS_DOWN, CROSS_DOWN, DOWN),
    "up_block_types": (UP, CROSS_UP, CROSS_UP, CROSS_UP, UP),
    "norm_num_groups": 32,
    "encoder_hid_dim_type": "text_proj",
    "encoder_hid_dim": 768,
}
OFFICIAL_DEFAULTS: dict[str, Any] = {
    "mid_block_type": "UNetMidBlock2DCrossAttn",
    "cross_attention_dim": 1280,
    "attention_head_dim": 8,
    "transformer_layers_per_block": 1,
    "use_linear_projection": False,
    "only_cross_attention": False,
    "upcast_attention": False,
    "flip_sin_to_cos": True,
    "freq_shift": 0,
    "time_embedding_type": "positional",
    "act_fn": "silu",
    "norm_eps": 1e-5,
    "dropout": 0.0,
    "downsample_padding": 1,
    "resnet_time_scale_shift": "default",
    "center_input_sample": False,
    "class_embed_type": None,
    "addition_embed_type": None,
}

#: Official parameter and tensor counts (reference §1, verified by `lctfound model inspect`).
OFFICIAL_PARAMETERS = 289_984_771
OFFICIAL_TENSORS = 752

#: The up blocks whose outputs form the features (reference §6.1: blocks=[[], [1, 2, 3, 4]]).
FEATURE_BLOCKS = (1, 2, 3, 4)
#: Diffusion timesteps of the paper's segmentation features.
FEATURE_TIMESTEPS = (0, 50, 100, 150)


@dataclass(frozen=True)
class Preset:
    name: str
    description: str
    unet_config: Mapping[str, Any]
    feature_blocks: tuple[int, ...] = FEATURE_BLOCKS
    feature_timesteps: tuple[int, ...] = FEATURE_TIMESTEPS
    notes: tuple[str, ...] = field(default_factory=tuple)

    @property
    def feature_channels_per_timestep(self) -> int:
        return feature_channels(self.unet_config, self.feature_blocks)

    @property
    def feature_channels(self) -> int:
        return self.feature_channels_per_timestep * len(self.feature_timesteps)


def _attention_at_one_eighth(widths: tuple[int, ...], groups: int, cross_attention_dim: int) -> dict[str, Any]:
    config = dict(OFFICIAL_UNET_CONFIG)
    config.update(OFFICIAL_DEFAULTS)
    config.update(
        block_out_channels=widths,
        # Levels 0..4 have outputs at 1/2, 1/4, 1/8, 1/16, 1/16; attention runs on the block's
        # input grid, so level 3 (input 1/8) and its mirror, up block 1, keep cross-attention.
        down_block_types=(DOWN, DOWN, DOWN, CROSS_DOWN, DOWN),
        up_block_types=(UP, CROSS_UP, UP, UP, UP),
        norm_num_groups=groups,
        cross_attention_dim=cross_attention_dim,
    )
    return config


def _official_config() -> dict[str, Any]:
    config = dict(OFFICIAL_DEFAULTS)
    config.update(OFFICIAL_UNET_CONFIG)
    return config


PRESETS: dict[str, Preset] = {
    preset.name: preset
    for preset in (
        Preset(
            "official",
            "The published LCTfound U-Net (289,984,771 parameters); GPU recommended.",
            _official_config(),
        ),
        Preset(
            "cpu-base",
            "Official block types and hooks, widths 32-64-128-256-256, attention at 1/8 only; "
            "CPU-practical backbone for models pretrained on a GPU.",
            _attention_at_one_eighth((32, 64, 128, 256, 256), groups=32, cross_attention_dim=256),
        ),
        Preset(
            "cpu-tiny",
            "Widths 16-32-64-96-128, attention at 1/8 only; small enough to ship in the repository "
            "(fp16 < 16 MB) and to pretrain on a CPU.",
            _attention_at_one_eighth((16, 32, 64, 96, 128), groups=8, cross_attention_dim=128),
        ),
    )
}


def get_preset(name: str) -> Preset:
    try:
        return PRESETS[name]
    except KeyError:
        raise LCTfoundError(f"unknown preset {name!r}; choose one of: {', '.join(PRESETS)}") from None


def feature_channels(unet_config: Mapping[str, Any], blocks: tuple[int, ...] = FEATURE_BLOCKS) -> int:
    """Channels of the hooked up-block outputs (up block i outputs reversed(widths)[i])."""
    widths = list(reversed(tuple(unet_config["block_out_channels"])))
    return sum(widths[index] for index in blocks)


def build_unet(config: Mapping[str, Any] | str, meta: bool = False):
    """Build a `UNet2DConditionModel` from a preset name or a config dict.

    With ``meta=True`` the parameters live on PyTorch's meta device: shapes and counts without
    allocating memory (the official model then builds in well under a second).
    """
    from diffusers import UNet2DConditionModel

    if isinstance(config, str):
        config = get_preset(config).unet_config
    kwargs = {key: (list(value) if isinstance(value, tuple) else value) for key, value in config.items()
              if not key.startswith("_")}
    try:
        if meta:
            from accelerate import init_empty_weights

            with init_empty_weights():
                return UNet2DConditionModel(**kwargs)
        return UNet2DConditionModel(**kwargs)
    except (TypeError, ValueError) as error:
        raise LCTfoundError(f"cannot build a UNet2DConditionModel from this config: {error}") from None


def describe_unet(unet) -> dict[str, Any]:
    """Parameter and tensor counts of a built U-Net (works on the meta device)."""
    state = unet.state_dict()
    return {
        "parameters": sum(parameter.numel() for parameter in unet.parameters()),
        "tensors": len(state),
        "feature_channels_per_timestep": feature_channels(unet.config),
    }


#: Bounds of a U-Net config that LCTfound can load: far beyond every real model, far below what
#: would exhaust a machine or hang while the network is built.
MAX_UNET_LEVELS = 8
MAX_UNET_WIDTH = 4096
MAX_UNET_PARAMETERS = 4_000_000_000
MAX_SAMPLE_SIZE = 4096


def check_unet_config(config: Mapping[str, Any], source: str = "U-Net config") -> None:
    """Refuse, in one line naming ``source``, a U-Net config that is malformed or absurd.

    Checked before anything is allocated: channel widths (count, range, divisible by the group
    norm), block type lists matching the widths, input/output channels, sample size, and the
    parameter count of the network it describes (built on PyTorch's meta device, no memory).
    """
    from ..errors import CheckpointError

    def whole(value: Any, low: int, high: int) -> bool:
        return isinstance(value, int) and not isinstance(value, bool) and low <= value <= high

    def fail(message: str) -> None:
        raise CheckpointError(f"{source}: {message}")

    widths = config.get("block_out_channels")
    if (not isinstance(widths, (list, tuple)) or not 1 <= len(widths) <= MAX_UNET_LEVELS
            or not all(whole(w, 1, MAX_UNET_WIDTH) for w in widths)):
        fail(f"block_out_channels {widths!r} must be 1 to {MAX_UNET_LEVELS} whole numbers from 1 to {MAX_UNET_WIDTH}")
    groups = config.get("norm_num_groups", 32)
    if not whole(groups, 1, MAX_UNET_WIDTH) or any(w % groups for w in widths):
        fail(f"norm_num_groups {groups!r} must divide every block width {list(widths)}")
    for key in ("down_block_types", "up_block_types"):
        types = config.get(key)
        if (not isinstance(types, (list, tuple)) or len(types) != len(widths)
                or not all(isinstance(t, str) for t in types)):
            fail(f"{key} must list one block type name per width ({len(widths)}), got {types!r}")
    for key in ("in_channels", "out_channels"):
        if not whole(config.get(key, 4), 1, 64):
            fail(f"{key} {config.get(key)!r} must be a whole number from 1 to 64")
    size = config.get("sample_size")
    sizes = list(size) if isinstance(size, (list, tuple)) else [size]
    factor = 2 ** (len(widths) - 1)
    if size is not None and not all(whole(s, 8, MAX_SAMPLE_SIZE) and s % factor == 0 for s in sizes):
        fail(f"sample_size {size!r} must be from 8 to {MAX_SAMPLE_SIZE} and a multiple of {factor}")
    layers = config.get("layers_per_block", 2)
    if not all(whole(n, 1, 16) for n in (layers if isinstance(layers, (list, tuple)) else [layers])):
        fail(f"layers_per_block {layers!r} must be from 1 to 16")
    # About 100 parameters per layer and squared width for these U-Nets: refuse an absurd network
    # before diffusers spends seconds laying it out.
    estimate = 50 * max(layers if isinstance(layers, (list, tuple)) else [layers]) * sum(w * w for w in widths)
    if estimate > MAX_UNET_PARAMETERS:
        fail(f"describes a network of more than {estimate:,} parameters (limit {MAX_UNET_PARAMETERS:,}); not a "
             "usable LCTfound model")
    try:
        unet = build_unet(dict(config), meta=True)
    except LCTfoundError as error:
        fail(str(error))
    except Exception as error:  # noqa: BLE001 - diffusers raises many kinds for a config it cannot build
        fail(f"cannot build a UNet2DConditionModel from it ({type(error).__name__}: "
             f"{' '.join(str(error).split())[:160]})")
    parameters = sum(p.numel() for p in unet.parameters())
    if parameters > MAX_UNET_PARAMETERS:
        fail(f"describes a network of {parameters:,} parameters (more than {MAX_UNET_PARAMETERS:,}); not a usable "
             "LCTfound model")
