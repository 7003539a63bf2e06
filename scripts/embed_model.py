#!/usr/bin/env python3
"""Turn a finished pretraining run into the embedded default model (fp16) with its model card.

    python scripts/embed_model.py runs/embedded --command "lctfound train pretrain ..."

Writes lctfound/models/embedded/<name>/ (model folder + MODEL_CARD.md) and copies the run's loss
curve and last sample grid to docs/ for the README. Refuses a model folder over 16 MB.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import shutil
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from lctfound.hashing import sha256_file  # noqa: E402
from lctfound.models import load_model, save_model  # noqa: E402
from lctfound.models.registry import EMBEDDED_DIR  # noqa: E402
from lctfound.training.logs import MetricsLog  # noqa: E402

LIMIT_BYTES = 16 * 2**20


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", type=Path, help="pretraining run folder (with model/, metrics.csv)")
    parser.add_argument("--command", required=True, help="the exact training command, for the model card")
    parser.add_argument("--wall-time", help="wall-clock time of the run, for the model card")
    parser.add_argument("--note", default="", help="anything else the model card must say about the run")
    args = parser.parse_args()

    model = load_model(args.run / "model")
    training = model.metadata["training"]
    name = model.metadata.get("name") or "lctfound-cpu-tiny"
    target = EMBEDDED_DIR / name
    save_model(model, target, weights_dtype=torch.float16, overwrite=True,
               extra_metadata={"name": name, "description": "Embedded default LCTfound model (cpu-tiny, "
                               "pretrained on the two pyradiomics sample CTs); see MODEL_CARD.md"})
    size = sum(p.stat().st_size for p in target.rglob("*") if p.is_file())
    if size > LIMIT_BYTES:
        shutil.rmtree(target)
        sys.exit(f"error: {size / 2**20:.1f} MB is over the 16 MB limit for an embedded model")

    rows = [r for r in MetricsLog.read(args.run / "metrics.csv") if int(float(r["step"])) <= training["step"]]
    last = rows[-10:]
    final_loss = sum(float(r["loss"]) for r in last) / len(last)
    first_loss = float(rows[0]["loss"])
    samples = sorted((args.run / "samples").glob("step-*.png"))
    docs = ROOT / "docs"
    docs.mkdir(exist_ok=True)
    shutil.copyfile(args.run / "loss_curve.png", docs / "embedded_loss_curve.png")
    if samples:
        shutil.copyfile(samples[-1], docs / "embedded_samples.png")
    sample_dir = Path(training["data_root"])
    data_rows = "\n".join(
        f"| `{p.name}` | {p.stat().st_size:,} | `{sha256_file(p)}` |"
        for p in sorted(sample_dir.glob("*_image.nrrd")))
    config = training["config"]
    card = f"""# {name}: the embedded default LCTfound model

A `cpu-tiny` LCTfound network ({sum(p.numel() for p in model.unet.parameters()):,} parameters in the U-Net;
learned window embeddings instead of BERT prompts) pretrained by DDPM on the two real sample CTs
shipped with this project. It makes every command and module work out of the box on a CPU. It is
**not** the official LCTfound model and has seen two patients: treat its features and samples as a
working default for trying the software, not as a research-grade backbone.

## Data
The image volumes of the `pyradiomics==3.0.1` source distribution (BSD-3-Clause; the origin of the
images is not documented there), fetched by `lctfound data fetch-sample`; label files excluded.
Training items: every slice of both volumes in both windows (lung W1500/L−500, mediastinal W400/L0),
{training['slices']} slices, {2 * training['slices']} items per epoch. Data fingerprint `{training['data_fingerprint']}`.

| file | bytes | sha256 |
| --- | --- | --- |
{data_rows}

## Training
- Command: `{args.command}`
- Steps: {training['step']} optimizer steps of {config['batch_size']} images ({f"{config['patch_size']}² patches cut from slices resized to {config['resolution']}²" if config['patch_size'] else f"whole slices resized to {config['resolution']}²; the model's native input size is {config['resolution']}², so features and generation run at that size"}), learning rate {config['learning_rate']} (cosine, {config['warmup_steps']} warm-up steps), AdamW, gradient clipping {config['grad_clip']}, EMA {config['ema_decay']} (the published weights are the EMA weights), 5 % null prompts, the official augmentations.
- Loss (ε-MSE): {first_loss:.3f} at step 1 → {final_loss:.3f} (mean of the last {len(last)} logged steps). Curve: `docs/embedded_loss_curve.png`.
- Hardware: {training.get('hardware', '?')}{f'; wall-clock {args.wall_time}' if args.wall_time else ''}.
- Date: {dt.date.today().isoformat()}; lctfound {model.metadata.get('lctfound_version')}, torch {torch.__version__}.
{f"- {args.note}" + chr(10) if args.note else ""}- Weights stored as float16 ({size / 2**20:.1f} MB in all); loaded as float32.

## Limitations
- Two patients, 5 mm slices, one scanner: the model has not seen the variety of real lung CT.
  Features are useful for trying few-shot workflows on the sample data, not for reporting results.
- Small network with attention only at 1/8 resolution (the `cpu-tiny` preset), trained for minutes
  on a CPU: generated slices (`docs/embedded_samples.png`) show body outlines and dark lung regions
  under heavy residual noise, not anatomy. Its denoising at small timesteps — what the features use —
  is much better than its sampling at large ones.
- Not a medical device; research use only.
"""
    (target / "MODEL_CARD.md").write_text(card)
    print(f"wrote {target} ({size / 2**20:.1f} MB) and docs/embedded_*.png")
    print(json.dumps({"steps": training["step"], "first_loss": first_loss, "final_loss": final_loss}))


if __name__ == "__main__":
    main()
