"""Training logs: a CSV of metrics (resumable), TensorBoard scalars and a loss-curve PNG."""

from __future__ import annotations

import csv
from pathlib import Path
from typing import Optional

FIELDS = ("step", "epoch", "loss", "lr", "grad_norm", "images_per_second", "elapsed_s", "micro_batch")


class MetricsLog:
    """``metrics.csv`` plus TensorBoard; on resume, rows after the resumed step are dropped."""

    def __init__(self, folder: Path, resume_step: int = 0, tensorboard: bool = True):
        self.path = folder / "metrics.csv"
        folder.mkdir(parents=True, exist_ok=True)
        rows = self.read(self.path) if self.path.exists() else []
        rows = [row for row in rows if int(float(row["step"])) <= resume_step]
        with open(self.path, "w", newline="") as handle:
            writer = csv.DictWriter(handle, FIELDS)
            writer.writeheader()
            writer.writerows(rows)
        self.writer = None
        if tensorboard:
            try:
                from torch.utils.tensorboard import SummaryWriter

                self.writer = SummaryWriter(str(folder / "tensorboard"), purge_step=resume_step + 1)
            except ImportError:  # tensorboard is optional for headless users
                self.writer = None

    @staticmethod
    def read(path: Path) -> list[dict]:
        with open(path, newline="") as handle:
            return list(csv.DictReader(handle))

    def write(self, row: dict) -> None:
        with open(self.path, "a", newline="") as handle:
            csv.DictWriter(handle, FIELDS).writerow({key: row.get(key, "") for key in FIELDS})
        if self.writer is not None:
            for key in ("loss", "lr", "grad_norm", "images_per_second"):
                if row.get(key) not in (None, ""):
                    self.writer.add_scalar(f"train/{key}", float(row[key]), int(row["step"]))
            self.writer.flush()

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()


def plot_loss_curve(metrics_csv: Path, output_png: Path, title: Optional[str] = None) -> None:
    """Loss per logged step and its exponential moving average, log-scaled, written atomically."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from ..atomic import atomic_file

    rows = MetricsLog.read(metrics_csv)
    if not rows:
        return
    steps = [int(float(r["step"])) for r in rows]
    losses = [float(r["loss"]) for r in rows]
    smooth, value = [], losses[0]
    for loss in losses:
        value = 0.9 * value + 0.1 * loss
        smooth.append(value)
    figure, axis = plt.subplots(figsize=(6, 3.6), dpi=110)
    axis.plot(steps, losses, lw=0.8, alpha=0.45, label="loss (ε-MSE)")
    axis.plot(steps, smooth, lw=1.8, label="moving average")
    axis.set_yscale("log")
    axis.set_xlabel("optimizer step")
    axis.set_ylabel("loss")
    axis.grid(alpha=0.3, which="both")
    axis.legend()
    axis.set_title(title or "LCTfound pretraining")
    figure.tight_layout()
    with atomic_file(output_png) as tmp:
        figure.savefig(tmp, format="png")
    plt.close(figure)
