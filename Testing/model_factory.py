"""Small real models for tests: presets shrunk to a 64² input, official-layout folders, a tiny BERT.

The official weights cannot be downloaded here, so loading code is tested on models built and
saved in the official layout (diffusers `save_pretrained`), exactly as the release was written.
"""

from __future__ import annotations

from pathlib import Path

import torch

from lctfound.models.bundle import LCTfoundModel
from lctfound.models.conditioning import LearnedConditionEncoder
from lctfound.models.presets import build_unet, get_preset
from lctfound.scheduler import make_ddpm_scheduler


def tiny_unet_config(sample_size: int = 64) -> dict:
    config = dict(get_preset("cpu-tiny").unet_config)
    config["sample_size"] = sample_size
    return config


def tiny_model(sample_size: int = 64, seed: int = 0) -> LCTfoundModel:
    torch.manual_seed(seed)
    unet = build_unet(tiny_unet_config(sample_size)).eval()
    metadata = {"preset": "cpu-tiny", "windows": ["lung", "mediastinal"], "conditioning": {"type": "learned"}}
    return LCTfoundModel(unet, make_ddpm_scheduler(), LearnedConditionEncoder().eval(), metadata)


def save_official_layout(folder: Path, sample_size: int = 64, seed: int = 0) -> Path:
    """A diffusers pipeline folder as the official training wrote it (no LCTfound metadata)."""
    model = tiny_model(sample_size, seed)
    model.unet.save_pretrained(folder / "unet", safe_serialization=True)
    model.scheduler.save_pretrained(folder / "scheduler")
    return folder


def save_tiny_bert(folder: Path) -> Path:
    """A 1-layer, 768-wide BERT with a small vocabulary, saved like a local `bert-base` folder."""
    from transformers import BertConfig, BertModel, BertTokenizer

    folder.mkdir(parents=True, exist_ok=True)
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "window", "width", "and", "level", "is", "."]
    words += [str(n) for n in (0, 40, 350, 400, 1500, "-", "500")] + ["freedom", "this", "image", "may"]
    (folder / "vocab.txt").write_text("\n".join(dict.fromkeys(words)) + "\n")
    BertTokenizer(str(folder / "vocab.txt")).save_pretrained(folder)
    torch.manual_seed(0)
    config = BertConfig(vocab_size=len(dict.fromkeys(words)), hidden_size=768, num_hidden_layers=1,
                        num_attention_heads=12, intermediate_size=64, max_position_embeddings=64)
    BertModel(config).save_pretrained(folder, safe_serialization=True)
    return folder


#: A small CT-FM SegResEncoder (4 initial filters, one block per stage) in the published layout:
#: the loading, windowing and retrieval code paths of the real one at a fraction of the cost.
SMALL_CTFM = {"blocks_down": [1, 1, 1, 1, 1], "in_channels": 1, "init_filters": 4, "spatial_dims": 3}


def save_small_ctfm_encoder(folder: Path, seed: int = 0) -> Path:
    """A randomly initialised `SMALL_CTFM` encoder saved in the published layout at ``folder``."""
    from lctfound.ctfm.model import new_model, save_model

    save_model(new_model(SMALL_CTFM, seed=seed), folder)
    return folder


def train_tiny_classifier(folder: Path, backbone: Path, name: str, spacing=(0.8, 0.8, 2.5)) -> Path:
    """A two-class scan classifier ('clear', 'dense': a bright corner) trained 2 steps on ``backbone``
    from four phantom scans; returns its model folder (``folder/run/model``)."""
    from data_factory import fewshot_phantom

    from lctfound.cli import main
    from lctfound.io.volume import CTVolume, write_volume

    rows = ["image,label"]
    for index in range(4):
        scan, _, _ = fewshot_phantom(seed=10 + index)
        scan[:, 40:, 40:] += 300.0 * (index % 2)
        write_volume(CTVolume(scan, spacing), folder / "train" / f"scan{index}.nrrd")
        rows.append(f"train/scan{index}.nrrd,{'dense' if index % 2 else 'clear'}")
    (folder / "cases.csv").write_text("\n".join(rows) + "\n")
    code = main(["classify", "train", "--backbone", str(backbone), "--table", str(folder / "cases.csv"),
                 "--slices-per-scan", "2", "--timesteps", "0,50", "-o", str(folder / "run"), "--max-steps", "2",
                 "--batch-size", "2", "--warmup-steps", "0", "--checkpoint-every", "2", "--seed", "1",
                 "--name", name])
    assert code == 0
    return folder / "run" / "model"
