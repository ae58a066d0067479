"""PNG plots of a run: loss curves (base vs cross branch, the paper's Fig. 6), accuracy,
confusion matrix. Uses matplotlib's object API (no global backend switch, no pyplot
state); every file is written to a temp name and renamed."""

from __future__ import annotations

from pathlib import Path

from .atomic import atomic_write

__all__ = ["plot_accuracy", "plot_confusion", "plot_losses"]


def _save(fig, path: Path) -> None:
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    FigureCanvasAgg(fig)
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, bbox_inches="tight"),
                 durable=False)


def plot_losses(history: list[dict], path: str | Path) -> None:
    """Per-epoch training loss of the base network and of the cross branch, and the test
    loss; ``history`` rows are the JSONL metrics of each epoch."""
    from matplotlib.figure import Figure
    fig = Figure(figsize=(6, 4))
    ax = fig.add_subplot()
    epochs = [h["epoch"] for h in history]
    for key, label in (("train_loss_base", "train: base"), ("train_loss_cross", "train: cross"),
                       ("val_loss", "validation (base)"), ("test_loss", "test (base)")):
        values = [h.get(key) for h in history]
        if any(v is not None for v in values):
            ax.plot(epochs, values, marker="o", ms=3, label=label)
    ax.set_xlabel("epoch")
    ax.set_ylabel("cross-entropy")
    ax.set_title("losses: base vs cross branch")
    ax.legend()
    ax.grid(alpha=0.3)
    _save(fig, Path(path))


def plot_accuracy(history: list[dict], path: str | Path) -> None:
    """Accuracy per epoch on the split evaluated each epoch (validation, or test when the
    run has no validation split)."""
    from matplotlib.figure import Figure
    fig = Figure(figsize=(6, 4))
    ax = fig.add_subplot()
    split = "val" if any("val_acc" in h for h in history) else "test"
    ax.plot([h["epoch"] for h in history], [100 * h[f"{split}_acc"] for h in history],
            marker="o", ms=3)
    ax.set_xlabel("epoch")
    ax.set_ylabel(f"{'validation' if split == 'val' else 'test'} accuracy (%)")
    ax.grid(alpha=0.3)
    _save(fig, Path(path))


def plot_confusion(confusion: list[list[int]], classes: list[str], path: str | Path,
                   title: str = "confusion matrix") -> None:
    """Row-normalised confusion matrix (rows: true class, columns: prediction) with counts."""
    import numpy as np
    from matplotlib.figure import Figure
    cm = np.asarray(confusion, dtype=np.float64)
    norm = cm / np.maximum(cm.sum(axis=1, keepdims=True), 1)
    k = len(classes)
    fig = Figure(figsize=(1.0 + 0.75 * k, 0.8 + 0.7 * k))
    ax = fig.add_subplot()
    ax.imshow(norm, cmap="Blues", vmin=0, vmax=1)
    ax.set_xticks(range(k), classes, rotation=45, ha="right")
    ax.set_yticks(range(k), classes)
    ax.set_xlabel("predicted")
    ax.set_ylabel("true")
    ax.set_title(title)
    for i in range(k):
        for j in range(k):
            ax.text(j, i, int(cm[i, j]), ha="center", va="center", fontsize=8,
                    color="white" if norm[i, j] > 0.5 else "black")
    _save(fig, Path(path))
