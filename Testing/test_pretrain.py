"""DDPM pretraining: learning, crash-safe checkpoints, exact resume, data handling, OOM fallback, 2 processes."""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

import data_factory
from lctfound.errors import LCTfoundError
from lctfound.io.volume import write_volume
from lctfound.models import load_model
from lctfound.training import loop as loop_module
from lctfound.training import pretrain as pretrain_module
from lctfound.training.data import BlockShuffleSampler, CTSliceDataset, index_sources
from lctfound.training.logs import MetricsLog
from lctfound.training.pretrain import PretrainConfig, list_checkpoints, pretrain

REPO = Path(__file__).resolve().parents[1]
FAST = ["--resolution", "32", "--batch-size", "2", "--num-samples", "0", "--log-every", "1"]


@pytest.fixture(scope="module")
def ct_folder(tmp_path_factory):
    """Two small synthetic CTs (12 + 10 slices) plus a label map that indexing must leave out."""
    folder = tmp_path_factory.mktemp("cts")
    write_volume(data_factory.synthetic_ct(seed=1), folder / "a.nrrd")
    write_volume(data_factory.synthetic_ct(shape=(10, 40, 48), seed=2), folder / "sub" / "b.nii.gz")
    write_volume(data_factory.nodule_label(data_factory.synthetic_ct()), folder / "a_label.nrrd")
    return folder


def cli(*args, env_extra=None, check=True):
    env = {**os.environ, "HF_HUB_OFFLINE": "1", **(env_extra or {})}
    result = subprocess.run([sys.executable, "-m", "lctfound", *map(str, args)], capture_output=True, text=True,
                            env=env, cwd=REPO, timeout=600)
    if check and result.returncode != 0:
        raise AssertionError(f"exit {result.returncode}: {result.stderr[-2000:]}")
    return result


def unet_weights(folder: Path) -> dict:
    return load_file(str(folder / "unet" / "diffusion_pytorch_model.safetensors"))


def test_indexing_reads_headers_skips_labels_and_corrupt_files(ct_folder, tmp_path):
    index = index_sources(ct_folder)
    assert [s.path.name for s in index.sources] == ["a.nrrd", "b.nii.gz"]
    assert index.num_slices == 22 and not index.skipped
    broken = tmp_path / "data"
    shutil.copytree(ct_folder, broken)
    (broken / "broken.nrrd").write_bytes(b"NRRD0004\ngarbage that is not a header")
    index = index_sources(broken)
    assert len(index.sources) == 2 and len(index.skipped) == 1
    assert "broken.nrrd" in index.summary() and "skipped 1" in index.summary()
    (tmp_path / "empty").mkdir()
    with pytest.raises(LCTfoundError, match="no CT volumes or slice files found"):
        index_sources(tmp_path / "empty")


def test_items_are_both_windows_and_deterministic(ct_folder):
    dataset = CTSliceDataset(index_sources(ct_folder), size=32, condition_dropout=0.0, seed=3)
    assert len(dataset) == 44
    first, again = dataset[5], dataset[5]
    assert torch.equal(first["pixel_values"], again["pixel_values"]) and first["pixel_values"].shape == (3, 32, 32)
    assert {dataset[0]["window"], dataset[1]["window"]} == {"lung", "mediastinal"}
    assert dataset[0]["prompt"] == "window width and window level is 1500 and -500."
    dataset.set_epoch(1)
    assert not torch.equal(first["pixel_values"], dataset[5]["pixel_values"])  # new augmentation each epoch
    everything_null = CTSliceDataset(index_sources(ct_folder), size=32, condition_dropout=1.0)
    assert everything_null[0]["prompt"] == "freedom."


def test_sampler_shards_are_disjoint_and_resumable():
    sizes = [24, 20, 30]
    ranks = [BlockShuffleSampler(sizes, seed=1, rank=r, world_size=2, block_sources=2) for r in (0, 1)]
    orders = [list(r) for r in ranks]
    assert not set(orders[0]) & set(orders[1]) and len(orders[0]) == len(orders[1]) == 37
    ranks[0].set_epoch(0, start=10)
    assert list(ranks[0]) == orders[0][10:]
    ranks[0].set_epoch(1)
    assert list(ranks[0]) != orders[0]


def test_loss_falls_and_outputs_are_written(ct_folder, tmp_path):
    output = tmp_path / "run"
    cli("train", "pretrain", ct_folder, "-o", output, "--resolution", "32", "--batch-size", "8", "--max-steps", "25",
        "--lr", "2e-3", "--warmup-steps", "2", "--checkpoint-every", "25", "--num-samples", "2",
        "--sample-steps", "2", "--log-every", "1")
    losses = [float(row["loss"]) for row in MetricsLog.read(output / "metrics.csv")]
    assert len(losses) == 25
    assert np.mean(losses[-5:]) < 0.6 * np.mean(losses[:3])
    assert (output / "loss_curve.png").stat().st_size > 1000
    assert (output / "samples" / "step-0000025.png").is_file()
    assert any((output / "tensorboard").iterdir())
    model = load_model(output / "model")
    assert model.metadata["training"]["step"] == 25 and model.metadata["training"]["slices"] == 22
    assert len(model.metadata["training"]["data_fingerprint"]) == 64
    # The trained model generates through the CLI: a PNG grid and a HU volume.
    cli("generate", "--model", output / "model", "-n", "2", "--steps", "2", "--size", "32", "-o", tmp_path / "g.png")
    cli("generate", "--model", output / "model", "-n", "3", "--steps", "2", "--size", "32",
        "--window", "mediastinal", "--guidance-scale", "2", "-o", tmp_path / "g.nii.gz")
    from lctfound.io.volume import read_volume

    generated = read_volume(tmp_path / "g.nii.gz", validate=False)
    assert generated.shape == (3, 32, 32) and -200 <= generated.array.min() and generated.array.max() <= 200


def test_resume_after_kill_9_matches_an_uninterrupted_run(ct_folder, tmp_path):
    args = ["train", "pretrain", ct_folder, *FAST, "--max-steps", "14", "--checkpoint-every", "2"]
    cli(*args, "-o", tmp_path / "reference")

    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    process = subprocess.Popen([sys.executable, "-m", "lctfound", *map(str, args), "-o", str(tmp_path / "crash")],
                               cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while not (tmp_path / "crash" / "checkpoints" / "step-0000004").exists():
        assert process.poll() is None, "the run ended before it could be killed"
        assert time.time() < deadline
        time.sleep(0.01)
    process.send_signal(signal.SIGKILL)
    assert process.wait() == -signal.SIGKILL
    steps = [step for step, _ in list_checkpoints(tmp_path / "crash")]
    assert steps and max(steps) < 14

    result = cli(*args, "-o", tmp_path / "crash", "--resume")
    assert "trained 14 steps" in result.stdout
    reference, resumed = unet_weights(tmp_path / "reference" / "model"), unet_weights(tmp_path / "crash" / "model")
    for name in reference:
        assert torch.equal(reference[name], resumed[name]), name
    logged = [int(row["step"]) for row in MetricsLog.read(tmp_path / "crash" / "metrics.csv")]
    assert logged == list(range(1, 15))

    # Resuming needs no repeated options: the run's settings come from its newest checkpoint.
    again = cli("train", "pretrain", "-o", tmp_path / "crash", "--resume", "--device", "cpu")
    assert "trained 14 steps" in again.stdout
    missing = cli("train", "pretrain", "-o", tmp_path / "nothing", check=False)
    assert missing.returncode == 2 and "DATA is required" in missing.stderr

    changed = cli(*args[:-4], "--max-steps", "14", "--checkpoint-every", "2", "--seed", "5", "-o",
                  tmp_path / "crash", "--resume", check=False)
    assert changed.returncode == 2 and "made with seed=421" in changed.stderr
    fresh = cli(*args, "-o", tmp_path / "crash", check=False)
    assert fresh.returncode == 2 and "pass --resume" in fresh.stderr


def test_failed_save_keeps_the_previous_checkpoint(ct_folder, tmp_path, monkeypatch):
    config = PretrainConfig(data=str(ct_folder), output=str(tmp_path / "run"), resolution=32, batch_size=2, max_steps=6,
                            checkpoint_every=2, num_samples=0)
    real_save = loop_module.save_state_dict

    def disk_full(state, folder, name):
        if "step-0000004" in str(folder.parent.name) or ".step-0000004" in str(folder):
            raise OSError(28, "No space left on device")
        real_save(state, folder, name)

    monkeypatch.setattr(loop_module, "save_state_dict", disk_full)
    with pytest.raises((OSError, LCTfoundError), match="[Nn]o space left"):
        pretrain(config)
    assert [step for step, _ in list_checkpoints(tmp_path / "run")] == [2]
    assert not [p for p in (tmp_path / "run" / "checkpoints").iterdir() if p.name.startswith(".")]
    load_model(tmp_path / "run" / "checkpoints" / "step-0000002" / "model")
    monkeypatch.setattr(loop_module, "save_state_dict", real_save)
    result = pretrain(config, resume=True)
    assert result.steps == 6 and result.resumed_from == 2


def test_out_of_memory_halves_the_micro_batch(ct_folder, tmp_path, monkeypatch):
    events = []
    original = pretrain_module.DiffusionModule.forward

    def forward(self, batch):
        if batch["pixel_values"].shape[0] > 1:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")
        return original(self, batch)

    monkeypatch.setattr(pretrain_module.DiffusionModule, "forward", forward)
    config = PretrainConfig(data=str(ct_folder), output=str(tmp_path / "run"), resolution=32, batch_size=4, max_steps=2,
                            checkpoint_every=2, num_samples=0, log_every=1)
    result = pretrain(config, on_event=events.append)
    assert result.steps == 2
    warnings = [e["message"] for e in events if e["event"] == "warning"]
    assert warnings[0].startswith("out of GPU memory with micro-batch 4; retrying with micro-batch 2")
    assert [e["micro_batch"] for e in events if e["event"] == "metrics"] == [1, 1]


def test_two_processes_see_disjoint_data_and_end_with_identical_weights(ct_folder, tmp_path):
    # torchrun is what `accelerate launch --multi_gpu` starts under the hood; gloo on CPU here.
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port", "29533",
               "-m", "lctfound", "train", "pretrain", str(ct_folder), "-o", str(tmp_path / "ddp"), *FAST,
               "--max-steps", "3", "--checkpoint-every", "3"]
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO, timeout=600,
                            env={**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    records = [json.loads((tmp_path / "ddp" / "ranks" / f"rank-{r}.json").read_text()) for r in (0, 1)]
    assert all(r["world_size"] == 2 and r["items_seen_this_session"] == 6 for r in records)
    assert not set(records[0]["items"]) & set(records[1]["items"])
    assert records[0]["weights_sha256"] == records[1]["weights_sha256"]
    assert load_model(tmp_path / "ddp" / "model").metadata["training"]["processes"] == 2
