"""Training curves as an image, and as ComfyUI's LOSS_MAP, from the trainer's history dict.

``history`` is ``Trainer.history``: ``{"steps": [{"step", "loss" (None when skipped), "t",
"skipped", "lr"}, ...], "val": [{"step", "accuracy", "error", "accuracy_base", "error_base"}, ...]}``.

Drawing uses matplotlib's object API (``Figure`` + ``FigureCanvasAgg``), never pyplot: pyplot
keeps global state and is not safe in a server's worker threads. matplotlib and PIL are
imported inside the functions so that ``training`` needs only torch.
"""

from __future__ import annotations

import math

LOSS_COLOR = "tab:blue"
VAL_COLOR = "tab:green"
SKIP_COLOR = "tab:red"


def _finite_losses(history: dict) -> tuple:
    """(steps, losses) of the steps with a finite loss."""
    pairs = [(r["step"], float(r["loss"])) for r in history.get("steps", [])
             if r.get("loss") is not None and not r.get("skipped") and math.isfinite(float(r["loss"]))]
    return [s for s, _ in pairs], [v for _, v in pairs]


def _moving_average(values: list, window: int) -> list:
    """Trailing mean over up to ``window`` values (shorter at the start), one value per input."""
    out, total = [], 0.0
    for i, v in enumerate(values):
        total += v
        if i >= window:
            total -= values[i - window]
        out.append(total / min(i + 1, window))
    return out


def history_to_loss_map(history: dict) -> dict:
    """ComfyUI's LOSS_MAP shape: {"loss": [...], "step": [...]} for the finite steps, plus
    "val_step", "val_accuracy" and "val_accuracy_base" lists from the validations."""
    steps, losses = _finite_losses(history)
    val = history.get("val", [])
    return {"loss": losses, "step": steps,
            "val_step": [v["step"] for v in val],
            "val_accuracy": [float(v["accuracy"]) for v in val],
            "val_accuracy_base": [float(v["accuracy_base"]) for v in val]}


def plot_history(history: dict, title: str | None = None, size=(8, 4.5)):
    """The training curves as an RGB PIL image: loss per step (raw and moving average, skipped
    steps marked) on the left, validation alignment accuracy (dashed: base) on the right."""
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure
    from PIL import Image

    fig = Figure(figsize=size, dpi=100)
    canvas = FigureCanvasAgg(fig)
    records = history.get("steps", [])
    if not records:
        ax = fig.add_subplot(1, 1, 1)
        ax.set_axis_off()
        ax.text(0.5, 0.5, "no steps yet", ha="center", va="center", fontsize=16, color="0.4",
                transform=ax.transAxes)
        if title:
            fig.suptitle(title)
    else:
        left, right = fig.subplots(1, 2)
        last = max([r["step"] for r in records] + [v["step"] for v in history.get("val", [])])
        xlim = (0, last + max(1, last // 50))
        _plot_loss(left, history, xlim)
        _plot_val(right, history, xlim)
        if title:
            fig.suptitle(title)
        fig.tight_layout()
    canvas.draw()
    return Image.frombuffer("RGBA", canvas.get_width_height(), canvas.buffer_rgba(), "raw", "RGBA", 0, 1).convert("RGB")


def _plot_loss(ax, history: dict, xlim: tuple) -> None:
    steps, losses = _finite_losses(history)
    if len(losses) == 1:
        ax.plot(steps, losses, color=LOSS_COLOR, marker="o", ms=4, linestyle="none", label="loss")
    elif losses:
        ax.plot(steps, losses, color=LOSS_COLOR, alpha=0.25, lw=0.8, label="loss")
        window = min(max(2, len(losses) // 10), 100)
        ax.plot(steps, _moving_average(losses, window), color=LOSS_COLOR, lw=1.6,
                label=f"moving average ({window})")
    skipped = [r["step"] for r in history["steps"] if r.get("skipped") or r.get("loss") is None]
    if skipped:
        # Skipped steps have no loss: mark them as ticks along the bottom of the panel.
        ax.plot(skipped, [0.0] * len(skipped), linestyle="none", marker="|", ms=10, color=SKIP_COLOR,
                transform=ax.get_xaxis_transform(), clip_on=False, label=f"skipped ({len(skipped)})")
    if not losses:
        ax.text(0.5, 0.5, "all steps skipped (non-finite loss)", ha="center", va="center",
                color="0.4", transform=ax.transAxes)
        ax.set_yticks([])
    ax.set_xlim(*xlim)
    ax.set(title="training loss", xlabel="step")
    ax.legend(fontsize=7, loc="upper right")


def _plot_val(ax, history: dict, xlim: tuple) -> None:
    val = history.get("val", [])
    ax.set_title("validation alignment accuracy")
    if not val:
        ax.text(0.5, 0.5, "no validation data", ha="center", va="center", color="0.4", transform=ax.transAxes)
        ax.set_xticks([])
        ax.set_yticks([])
        return
    ax.plot([v["step"] for v in val], [v["accuracy"] for v in val], color=VAL_COLOR, marker="o", ms=3,
            label="with tokens")
    base = val[-1].get("accuracy_base")
    if base is not None:
        ax.axhline(base, color="0.4", ls="--", lw=1, label="base (no tokens)")
    ax.set_xlim(*xlim)
    ax.set_xlabel("step")
    ax.legend(fontsize=7, loc="lower right")
