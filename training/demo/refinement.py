"""Step-selected refinement in the demo sampler (STEP_SELECTION.md; core in ``training/refine.py``).

At one chosen step index of the demo's DDIM schedule, sampling pauses and the latent is refined
(IterRef) with the gradient of an attention-map loss on the conditional prompt alone; the step's
CFG denoising then runs on the refined latent. ``pretrain.sample(..., refine=Refiner(...))``.

Demo choices:
- subjects of a caption (``subjects``): the shape word as written ("circles") for a count scene,
  the two shape words for a relation scene (a repeated shape word: its first and second
  occurrence);
- token positions from the word tokenizer (position 0 = BOS, one token per word, EOS, PAD) via
  ``attention_maps.find_subject``; the renormalisation window is SD1's: drop BOS, keep EOS and
  padding but the last position;
- attention capture on the 8x8 cross-attention layers (down block 1 and up block 1 of the tiny
  UNet on 16x16 latents): latent / 2 here, the analogue of SD1.5's 16x16 maps of a 64x64 latent
  (the coarsest cross-attention grid that still resolves where two shapes are; 4x4 cannot).
"""

from __future__ import annotations

from dataclasses import replace

import torch

from ..attention_maps import Stream, batch_loss, find_subject, step_size
from ..refine import AttentionCapture, RefineSettings, refine_latent
from . import world
from .textenc import SPECIALS

GRID = (8, 8)
# The demo's refinement step: index into the 12-step DDIM schedule (``pretrain.ddim_timesteps(12)``:
# 999, 916, 832, 749, 666, 582, 499, 416, 332, 249, 166, 82). Chosen by
# `python -m training refine-sweep --steps 5-11 --seeds 3 --n 128 --iterations 5` (the demo's 5 iterations,
# scale 200) on validation prompts (train split, prompt/noise seeds 30000-30002; never the demo's report
# prompts) for the shipped model: every step lost overall; step 11 (t = 82) least, 0.458 ± 0.027 against
# 0.466 ± 0.022 without refinement (paired -0.008 ± 0.006; steps 5-10 lost 0.010-0.018). Steps 0-4 were not
# swept on this model: on an earlier one (every step, 10 iterations) steps 0-6 lost 0.018-0.034. On the
# first-phase model steps 5-9 gave step 9 at +0.003 ± 0.019. See the README's "Step-selected refinement" section.
DEFAULT_STEP = 11
# The demo's IterRef settings (the sweep's): CN+IoU loss (the official mean), 10 iterations, step size
# alpha_i = 200 * sqrt(linspace(1, 0.5, 12)[i]). A&E's scale 20 is tuned for SD's 4x64x64 latents; on this
# model it moves the loss by < 1% in 10 iterations and changes no score. A short probe on the validation
# prompts (96 prompts, 1 seed, steps 1/4/7, scales 20/200/1000/5000) kept 200: at 1000 and above the
# images break up (overall -0.04 to -0.30), at 200 the loss falls ~4% in 10 iterations.
DEFAULT_SETTINGS = RefineSettings(iterations=10, loss="cn+iou", scale=200.0)
VALIDATION_SEED = 30_000  # validation prompts and noise: seeds 30000 + s (demo report: 10000 + s, 20000; data: 1..4)


def subjects(spec) -> list:
    """The subject words of a world Spec (or caption): ["circles"] or ["square", "triangle"]."""
    spec = world.parse_caption(spec) if isinstance(spec, str) else spec
    if spec.kind == "count":
        shape = spec.objects[0][1]
        return [shape + ("s" if spec.count > 1 else "")]
    return [spec.objects[0][1], spec.objects[1][1]]


def pieces(tokenizer, caption: str) -> list:
    """The tokenizer's strings of a caption: ["<bos>", words..., "<eos>", "<pad>", ...]."""
    ids = tokenizer([caption])[0].tolist()
    names = list(SPECIALS) + list(tokenizer.words)
    return [names[i] for i in ids]


def window(length: int) -> tuple:
    """SD1's renormalisation window: drop BOS, keep EOS and padding except the last position."""
    return (1, length - 1)


def positions(tokenizer, caption: str, words: list | None = None) -> tuple:
    """Token positions of each subject word of a caption (default: ``subjects(caption)``).

    A word that occurs twice ("a red circle left of a blue circle") is found in order: the
    second subject is searched after the first. ValueError names a subject that is not there.
    """
    words = subjects(caption) if words is None else list(words)
    p = pieces(tokenizer, caption)
    w0, w1 = window(len(p))
    found, start = [], w0
    for word in words:
        pos = find_subject(p, word, (start, w1))
        if not pos and start > w0:
            pos = find_subject(p, word, (w0, w1))
        if not pos:
            text = " ".join(x for x in p[w0:w1] if not x.startswith("<"))
            raise ValueError(f"subject {word!r} not found in the caption tokens ({text!r}); subjects must be "
                             f"words of the prompt")
        found.append(pos)
        start = pos[-1] + 1 if pos[-1] + 1 < w1 else w0
    return tuple(found)


def streams(tokenizer, captions: list, words: list | None = None) -> list:
    """Per caption, the one-stream list ``attention_maps.batch_loss`` expects."""
    length = tokenizer.length
    return [[Stream(columns=(0, length), window=window(length), subjects=positions(tokenizer, c, words))]
            for c in captions]


class Refiner:
    """The ``refine`` hook of ``pretrain.sample``: IterRef at step index ``step``.

    ``prepare(prompts, n_steps)`` is called by the sampler before any sampling (subjects and
    step are checked there: ValueError); ``__call__(x, t, prompts, context)`` refines one
    batch's latent at timestep t with the conditional context only (no CFG) and returns it.
    token_layout: the layout of an installed TokenInjector (soft tokens): the captured maps
    drop its columns. ``history`` holds, per sampled batch, refine_latent's loss history.
    """

    def __init__(self, unet, tokenizer, step: int = DEFAULT_STEP, settings: RefineSettings = DEFAULT_SETTINGS,
                 token_layout=None, grid: tuple = GRID, words: list | None = None):
        if not (isinstance(step, int) and step >= 0):
            raise ValueError(f"refinement step must be a step index >= 0, got {step!r}")
        self.unet, self.tokenizer, self.step, self.settings = unet, tokenizer, step, settings
        self.token_layout, self.grid, self.words = token_layout, tuple(grid), words
        self.n_steps, self.history, self._streams = None, [], {}

    def prepare(self, prompts: list, n_steps: int) -> None:
        if not 0 <= self.step < n_steps:
            raise ValueError(f"refinement step {self.step} is outside the {n_steps}-step schedule "
                             f"(indices 0..{n_steps - 1})")
        self.n_steps = n_steps
        self._streams = {c: streams(self.tokenizer, [c], self.words)[0] for c in dict.fromkeys(prompts)}
        self.history = []

    def alpha(self) -> float:
        return step_size(self.step, self.n_steps, self.settings.scale, self.settings.scale_range)

    def __call__(self, x: torch.Tensor, t: int, prompts: list, context: torch.Tensor) -> torch.Tensor:
        if self.settings.iterations == 0:
            return x
        if self.n_steps is None:
            raise ValueError("Refiner.prepare(prompts, n_steps) must run before refining")
        st = [self._streams[p] if p in self._streams else streams(self.tokenizer, [p], self.words)[0]
              for p in prompts]
        tt = torch.full((x.shape[0],), int(t), dtype=torch.long, device=x.device)
        capture = AttentionCapture(self.unet, grid=self.grid, token_layout=self.token_layout)
        s = self.settings

        def loss_fn(xg):
            with capture:
                self.unet(xg, tt, encoder_hidden_states=context)
            return batch_loss(capture.maps(), st, s.loss, s.smoothing)

        x, hist = refine_latent(x, loss_fn, self.alpha(), s.iterations, s.threshold)
        self.history.append(hist)
        return x


def settings_with(iterations: int | None = None, loss: str | None = None, scale: float | None = None):
    """DEFAULT_SETTINGS with the given fields replaced (None keeps the default)."""
    given = {k: v for k, v in (("iterations", iterations), ("loss", loss), ("scale", scale)) if v is not None}
    return replace(DEFAULT_SETTINGS, **given)


# --- the step sweep (``python -m training refine-sweep``) ------------------------------------

def parse_steps(text: str | None, n_steps: int) -> list:
    """Candidate step indices from "0,2,4" or "0-5" (default: every index of the schedule); ValueError outside it."""
    if text is None or not str(text).strip():
        return list(range(n_steps))
    out = []
    for part in str(text).split(","):
        part = part.strip()
        if not part:
            continue
        try:
            if "-" in part:
                a, b = (int(v) for v in part.split("-", 1))
                out.extend(range(a, b + 1))
            else:
                out.append(int(part))
        except ValueError:
            raise ValueError(f"--steps takes step indices like '0,2,4' or '0-5', got {text!r}") from None
    bad = [s for s in out if not 0 <= s < n_steps]
    if bad or not out:
        raise ValueError(f"step indices {bad or out} are outside the {n_steps}-step schedule (indices 0..{n_steps - 1})")
    return sorted(dict.fromkeys(out))


def validation_prompts(seed: int, n: int) -> list:
    """The sweep's validation specs: n train-split captions of seed VALIDATION_SEED + seed."""
    return world.sample_specs(VALIDATION_SEED + seed, n, "train")


def run_sweep(out_dir, steps: list, seeds: int = 3, n: int = 128, settings: RefineSettings = DEFAULT_SETTINGS,
              sample_steps: int = 12, cfg: float = 3.0, model=None, progress: bool = True) -> dict:
    """GenEval-mini with refinement at each candidate step and without (baseline); writes sweep.md/json/png.

    Per seed s: the same n validation prompts (``validation_prompts(s)``) and sampling noise
    (seed VALIDATION_SEED + s) in every row. Returns the summary (also in sweep.json), with
    "best_step": the candidate with the highest mean overall score (ties: mean over categories).
    """
    import json
    import time
    from pathlib import Path

    import numpy as np

    from . import pretrain
    from .geneval_mini import CATEGORIES, evaluate

    steps = parse_steps(",".join(map(str, steps)), sample_steps)
    if seeds < 1 or n < 1:
        raise ValueError(f"need seeds >= 1 and n >= 1, got {seeds}, {n}")
    unet, encode = pretrain.load_tiny_t2i(path=model)
    for s in range(seeds):  # subjects of every prompt are checked before any sampling
        streams(encode.tokenizer, [p.caption for p in validation_prompts(s, n)])
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    rows = {"baseline": []} | {str(k): [] for k in steps}
    seconds = {k: 0.0 for k in rows}
    losses = {str(k): [] for k in steps}
    jobs = [(s, k) for s in range(seeds) for k in ["baseline"] + steps]
    bar = None
    if progress:
        from tqdm.auto import tqdm
        bar = tqdm(total=len(jobs), desc="refine-sweep", unit="run")
    for s, k in jobs:
        specs = validation_prompts(s, n)
        refiner = None if k == "baseline" else Refiner(unet, encode.tokenizer, step=k, settings=settings)
        t0 = time.time()
        images = pretrain.sample(unet, encode, [p.caption for p in specs], seed=VALIDATION_SEED + s,
                                 steps=sample_steps, cfg=cfg, refine=refiner)
        seconds[str(k)] += time.time() - t0
        acc = evaluate(images, specs)
        rows[str(k)].append({c: acc.get(c, float("nan")) for c in CATEGORIES})
        if refiner is not None and refiner.history and refiner.history[0]:
            first = np.concatenate([b[0]["loss"] for b in refiner.history])
            last = np.concatenate([b[-1]["loss"] for b in refiner.history])
            losses[str(k)].append((float(first.mean()), float(last.mean())))
        if bar is not None:
            bar.update(1)
    if bar is not None:
        bar.close()

    def ms(vals):
        v = np.array(vals, dtype=float)
        v = v[~np.isnan(v)]
        return (float(v.mean()), float(v.std())) if len(v) else (float("nan"), float("nan"))

    stats = {k: {c: ms([r[c] for r in rs]) for c in CATEGORIES} for k, rs in rows.items()}
    deltas = {str(k): {c: ms([r[c] - b[c] for r, b in zip(rows[str(k)], rows["baseline"])]) for c in CATEGORIES}
              for k in steps}
    best = max(steps, key=lambda k: (stats[str(k)]["overall"][0],
                                     np.nanmean([stats[str(k)][c][0] for c in CATEGORIES])))
    ts = pretrain.ddim_timesteps(sample_steps)
    summary = {"steps": steps, "timesteps": {str(k): ts[k] for k in steps}, "seeds": seeds, "n": n,
               "sample_steps": sample_steps, "cfg": cfg, "settings": {**settings.__dict__},
               "validation_seed": VALIDATION_SEED, "per_seed": rows, "mean_std": stats, "paired_delta": deltas,
               "loss_first_last": losses, "seconds": {k: round(v, 1) for k, v in seconds.items()},
               "best_step": best}
    (out / "sweep.json").write_text(json.dumps(summary, indent=1))
    (out / "sweep.md").write_text(sweep_table(summary))
    plot_sweep(out / "sweep.png", summary)
    return summary


def sweep_table(summary: dict) -> str:
    """Markdown: per candidate step, mean ± std over seeds of each category, and the paired change of overall."""
    from .geneval_mini import CATEGORIES

    st, d = summary["mean_std"], summary["paired_delta"]
    s = summary["settings"]
    lines = [f"Refinement step sweep: {summary['n']} validation prompts x {summary['seeds']} seed(s), "
             f"{summary['sample_steps']} DDIM steps, CFG {summary['cfg']:g}; IterRef {s['iterations']} iterations, "
             f"loss {s['loss']}, step size {s['scale']:g} * sqrt(linspace({s['scale_range'][0]:g}, "
             f"{s['scale_range'][1]:g}, {summary['sample_steps']})[i]). Mean ± std over seeds; "
             f"\"overall − baseline\": paired per seed (same prompts and noise).", "",
             "| step (t) | " + " | ".join(CATEGORIES) + " | overall − baseline | CN+IoU loss first → last |",
             "|---" * (len(CATEGORIES) + 3) + "|"]
    cell = lambda v: f"{v[0]:.3f} ± {v[1]:.3f}"  # noqa: E731
    lines.append("| no refinement | " + " | ".join(cell(st["baseline"][c]) for c in CATEGORIES) + " | | |")
    for k in summary["steps"]:
        k = str(k)
        fl = summary["loss_first_last"].get(k) or []
        loss = f"{sum(a for a, _ in fl) / len(fl):.3f} → {sum(b for _, b in fl) / len(fl):.3f}" if fl else ""
        mark = " **best**" if int(k) == summary["best_step"] else ""
        lines.append(f"| {k} ({summary['timesteps'][k]}){mark} | " + " | ".join(cell(st[k][c]) for c in CATEGORIES)
                     + f" | {d[k]['overall'][0]:+.3f} ± {d[k]['overall'][1]:.3f} | {loss} |")
    return "\n".join(lines) + "\n"


def plot_sweep(path, summary: dict) -> None:
    """Overall score vs step (error bars: std over seeds; baseline as a line and band), and per category."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from .geneval_mini import CATEGORIES

    st = summary["mean_std"]
    ks = summary["steps"]
    fig, (a, b) = plt.subplots(1, 2, figsize=(11, 3.8))
    m = [st[str(k)]["overall"][0] for k in ks]
    e = [st[str(k)]["overall"][1] for k in ks]
    bm, be = st["baseline"]["overall"]
    a.errorbar(ks, m, yerr=e, marker="o", capsize=3, label="refinement at step i")
    a.axhline(bm, color="gray", ls="--", label="no refinement")
    a.axhspan(bm - be, bm + be, color="gray", alpha=0.15)
    a.set(title="GenEval-mini overall (validation prompts)", xlabel="refinement step index i", ylabel="accuracy")
    a.legend(fontsize=8)
    for c in CATEGORIES:
        if c == "overall":
            continue
        line = b.plot(ks, [st[str(k)][c][0] for k in ks], marker=".", label=c)[0]
        b.axhline(st["baseline"][c][0], color=line.get_color(), ls=":", lw=1)
    b.set(title="per category (dotted: no refinement)", xlabel="refinement step index i")
    b.legend(fontsize=7, ncol=2)
    for ax in (a, b):
        ax.set_xticks(ks)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
