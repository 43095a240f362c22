"""Training curves: plot_history images (incl. empty, one-step and all-skipped histories) and
history_to_loss_map."""

import math
import subprocess
import sys
import threading
from pathlib import Path

import numpy as np
import pytest

from training.plot import history_to_loss_map, plot_history


def make_history(n=60, skip=(7, 8, 30), val_every=20):
    steps = [{"step": i, "loss": None if i in skip else 1.0 / i + 0.01 * math.sin(i), "t": 10 * i,
              "skipped": i in skip, "lr": 1e-3} for i in range(1, n + 1)]
    val = [{"step": s, "accuracy": 0.5 + 0.01 * s / val_every, "error": 0.2, "accuracy_base": 0.52,
            "error_base": 0.21} for s in range(val_every, n + 1, val_every)]
    return {"steps": steps, "val": val}


def pixels(img):
    return np.asarray(img).reshape(-1, 3)


def n_colors(img):
    return len(np.unique(pixels(img), axis=0))


def non_white(img):
    return int((pixels(img) < 250).any(axis=1).sum())


def test_full_history_image():
    img = plot_history(make_history(), title="softrepa sd15")
    assert img.mode == "RGB" and img.size == (800, 450)
    assert n_colors(img) > 20 and non_white(img) > 5000
    # Blue loss curve, green validation curve, red skipped-step marks are all drawn.
    arr = np.asarray(img).astype(int)
    r, g, b = arr[..., 0], arr[..., 1], arr[..., 2]
    assert ((b > 150) & (r < 100)).sum() > 50
    assert ((g > 100) & (r < 80) & (b < 80)).sum() > 20
    assert ((r > 180) & (g < 80) & (b < 80)).sum() > 5


def test_size_is_respected():
    img = plot_history(make_history(n=5), size=(4, 3))
    assert img.size == (400, 300)


@pytest.mark.parametrize("history", [
    {"steps": [], "val": []},
    {},
    make_history(n=1, skip=(), val_every=100),
    make_history(n=1, skip=(1,), val_every=1),
    make_history(n=10, skip=tuple(range(1, 11)), val_every=100),
    make_history(n=10, skip=tuple(range(1, 11)), val_every=5),
    make_history(n=3, skip=(), val_every=100),
])
def test_edge_cases_give_an_image(history):
    img = plot_history(history)
    assert img.mode == "RGB" and img.size == (800, 450)
    assert non_white(img) > 200  # text or axes, never a blank image


def test_empty_history_differs_from_a_real_plot():
    empty = plot_history({"steps": [], "val": []})
    assert non_white(empty) < non_white(plot_history(make_history()))


def test_plots_from_threads():
    # The object API (no pyplot) must work from several threads at once, as in a server.
    results, errors = [], []

    def work():
        try:
            results.append(plot_history(make_history()).size)
        except Exception as e:  # noqa: BLE001 - reported below
            errors.append(e)

    threads = [threading.Thread(target=work) for _ in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors and results == [(800, 450)] * 4


def test_loss_map():
    h = make_history(n=40, skip=(7, 8, 30), val_every=20)
    lm = history_to_loss_map(h)
    assert set(lm) == {"loss", "step", "val_step", "val_accuracy", "val_accuracy_base"}
    assert len(lm["loss"]) == len(lm["step"]) == 37
    assert 7 not in lm["step"] and 30 not in lm["step"] and lm["step"][:7] == [1, 2, 3, 4, 5, 6, 9]
    assert all(isinstance(v, float) and math.isfinite(v) for v in lm["loss"])
    assert lm["loss"][0] == pytest.approx(1.0 + 0.01 * math.sin(1))
    assert lm["val_step"] == [20, 40]
    assert lm["val_accuracy"] == pytest.approx([0.51, 0.52])
    assert lm["val_accuracy_base"] == [0.52, 0.52]


def test_loss_map_of_empty_and_all_skipped_histories():
    empty = {"loss": [], "step": [], "val_step": [], "val_accuracy": [], "val_accuracy_base": []}
    assert history_to_loss_map({"steps": [], "val": []}) == empty
    assert history_to_loss_map(make_history(n=3, skip=(1, 2, 3), val_every=100)) == empty


def test_import_does_not_load_matplotlib():
    code = "import sys, training.plot; assert 'matplotlib' not in sys.modules and 'PIL' not in sys.modules"
    r = subprocess.run([sys.executable, "-c", code], cwd=Path(__file__).resolve().parents[1],
                       capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
