"""``python -m training demo``: SoftREPA and AGSM tokens trained and measured on the tiny world.

The shipped tiny text-to-image model (``training/assets/tiny_t2i``) is the frozen backbone.
The demo uses the engine exactly as a user would: a ``DiffusersBackend`` around the UNet, the
``Trainer`` with in-memory ground-truth renders of training-split captions, and the
alignment score on held-out pairs. For each seed it trains one SoftREPA and one AGSM token
set, then measures base / SoftREPA / AGSM with

- GenEval-mini on held-out prompts (attribute combinations never seen in pretraining),
- the diffusion-classifier alignment score on held-out image-caption pairs,
- a sample-quality proxy (the share of "clean" pixels: near black or near a palette colour),

and writes a report folder: ``report.md`` (table, mean ± std over seeds), ``curves.png``,
``grid.png``, ``results.json`` and the token files.

Settings scaled to the tiny model (documented in the report):
- temperatures: the official tau = 0.07 (SoftREPA) and T = 0.1 (AGSM) assume Stable
  Diffusion's error scale; this model's errors are several times smaller, so both are
  calibrated on the base model (``calibrate_temperatures``);
- AGSM's EMA decay: 0.9999 lags ~10k steps; the demo's runs are a few hundred steps, so the
  decay is scaled to 0.99;
- lr 1e-2 instead of the official 1e-3: these runs are a few hundred steps, not tens of
  thousands (at 1e-3 the tokens barely moved in 300 steps);
- blocks down + mid, 4 tokens, batch 4 (16 pairs), validation every 100 steps.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from ..diffusers_backend import DiffusersBackend
from ..formats import save_tokens
from ..layouts import TokenLayout
from ..pairs import pair_errors
from ..score import alignment_score
from ..trainer import TensorData, TrainConfig, bos_init, train
from . import pretrain, world
from .geneval_mini import CATEGORIES, evaluate

CONDITIONS = ("base", "softrepa", "agsm")


@dataclass(frozen=True)
class DemoSize:
    seeds: tuple = (0, 1, 2)
    steps: int = 300
    n_train: int = 256
    n_val: int = 64
    n_eval: int = 96
    sample_steps: int = 20
    val_every: int = 100
    ema_decay: float = 0.99
    lr: float = 1e-2


FULL = DemoSize()
SMOKE = DemoSize(seeds=(0,), steps=12, n_train=32, n_val=16, n_eval=16, sample_steps=6, val_every=6)
LONG = DemoSize(seeds=(0,), steps=3000, n_train=1024, n_val=64, n_eval=96, val_every=100)


def world_pairs(encode, n: int, split: str, seed: int):
    """(x0 latents, {"context"}, specs) of n ground-truth renders of a split's captions."""
    specs = world.sample_specs(seed, n, split)
    imgs = np.stack([world.render(s, [seed, i])[0] for i, s in enumerate(specs)])
    x0 = pretrain.images_to_latents(pretrain.to_model_images(imgs))
    return x0, {"context": encode([s.caption for s in specs])}, specs


def calibrate_temperatures(backend, x0, cond, batch: int = 4, n_batches: int = 8, seed: int = 0) -> tuple:
    """(tau, temp): SoftREPA's and AGSM's temperatures matched to the model's error scale.

    Measured on the base model over ``n_batches`` batches of ``batch`` images at random t:
    - SoftREPA's logits s * exp(-E / tau) depend on the error *level*: the official tau = 0.07
      puts Stable Diffusion's typical errors at E / tau ~ 2. We keep that ratio: tau = median(E) / 2.
      (Matching the tiny model's much smaller errors with 0.07 would leave the logits flat;
      matching the spread instead would underflow them to zero.)
    - AGSM's weights softmax(-E / T) only see error *differences*: T = the median within-row
      standard deviation of E, so the caption-dependent part is O(1).
    """
    g = torch.Generator().manual_seed(seed)
    levels, spreads = [], []
    for _ in range(n_batches):
        idx = torch.randperm(x0.shape[0], generator=g)[:batch]
        t = int(torch.randint(0, 1000, (1,), generator=g))
        noise = torch.randn((1,) + tuple(x0.shape[1:]), generator=g)
        E = pair_errors(backend, x0[idx], {k: v[idx] for k, v in cond.items()}, t, noise, None)
        levels.append(E.median().item())
        spreads.append(E.std(dim=1).median().item())
    return float(np.median(levels)) / 2, float(np.median(spreads))


def clean_pixel_rate(images: torch.Tensor) -> float:
    """Share of pixels within 40/255 (max channel) of black or of a palette colour."""
    px = ((images.clamp(-1, 1) + 1) * 127.5).permute(0, 2, 3, 1).reshape(-1, 3)
    palette = torch.tensor([world.BACKGROUND] + list(world.COLOURS.values()), dtype=px.dtype)
    dist = (px[:, None, :] - palette[None]).abs().amax(-1).amin(-1)
    return (dist <= 40).float().mean().item()


def measure(unet, encode, backend, tokens, val, size: DemoSize, seed: int) -> dict:
    """GenEval-mini (held-out prompts), alignment score and quality proxy, for tokens or None."""
    specs = world.sample_specs(10_000 + seed, size.n_eval, "heldout")
    ctx = backend.use_tokens(tokens) if tokens is not None else None
    images = pretrain.sample(unet, encode, [s.caption for s in specs], seed=seed, steps=size.sample_steps,
                             tokens_injector=ctx)
    acc = evaluate(images, specs)
    # NaN where no prompt of a category was drawn (possible in tiny runs), so every row has every key
    out = {f"geneval_{k}": acc.get(k, float("nan")) for k in CATEGORIES}
    key = "accuracy" if tokens is not None else "accuracy_base"
    out["align"] = alignment_score(backend, tokens, val[0], val[1], base=tokens is None)[key]
    out["quality"] = clean_pixel_rate(images)
    return out


def run_demo(out_dir="demo_report", size: DemoSize = FULL, progress: bool = True, model=None) -> Path:
    """Train and measure both methods over ``size.seeds``; write and return the report folder.

    model: a tiny_t2i folder (default: the shipped one).
    """
    from tqdm.auto import tqdm

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.time()
    unet, encode = pretrain.load_tiny_t2i(path=model)
    backend = DiffusersBackend(unet, alphas_cumprod=pretrain.alphas_cumprod())
    x_train, c_train, _ = world_pairs(encode, size.n_train, "train", seed=1)
    val = world_pairs(encode, size.n_val, "heldout", seed=2)[:2]
    tau, temp = calibrate_temperatures(backend, x_train, c_train)
    width = c_train["context"].shape[-1]
    null = bos_init(encode([""]))
    base_cfg = TrainConfig(steps=size.steps, batch=4, lr=size.lr, val_every=size.val_every, ckpt_every=0, tau=tau,
                           temp=temp, ema_decay=size.ema_decay, score_group=4)

    jobs = [(s, c) for s in size.seeds for c in CONDITIONS]
    bar = tqdm(total=len(jobs), desc="demo", unit="run", disable=not progress)
    results, histories, token_files = {c: [] for c in CONDITIONS}, {}, {}
    for seed, cond in jobs:
        bar.set_postfix(seed=seed, run=cond)
        tokens = None
        if cond != "base":
            layout = TokenLayout(arch="sd15", method=cond, n_tokens=4, width=width, text_width=width,
                                 blocks=("down", "mid"))
            cfg = replace(base_cfg, method=cond, seed=seed)
            file = out / "tokens" / f"{cond}_seed{seed}.safetensors"
            res = train(backend, layout, TensorData(x_train, c_train, cfg.batch, seed=seed), cfg, file,
                        val=val, init_static=null, overwrite=True, progress=progress,
                        meta={"model": "tiny_t2i (demo)", "data": f"demo world, {size.n_train} train renders"})
            tokens, histories[(cond, seed)], token_files[(cond, seed)] = res.tokens, res.history, file
        results[cond].append(measure(unet, encode, backend, tokens, val, size, seed))
        bar.update(1)
    bar.close()
    elapsed = time.time() - t_start
    write_report(out, size, (tau, temp), results, histories, unet, encode, backend, token_files, elapsed)
    return out


def summarize(rows: list) -> dict:
    """{metric: (mean, std)} over seeds, ignoring NaN (a category no prompt of a seed fell in)."""
    out = {}
    for k in rows[0]:
        vals = np.array([r[k] for r in rows], dtype=float)
        vals = vals[~np.isnan(vals)]
        out[k] = (float(vals.mean()), float(vals.std())) if len(vals) else (float("nan"), float("nan"))
    return out


def paired_deltas(results: dict) -> dict:
    """{method: {metric: (mean, std)}} of (method - base) per seed: same prompts, noise and pairs."""
    return {c: summarize([{k: r[k] - b[k] for k in b} for r, b in zip(results[c], results["base"])])
            for c in results if c != "base"}


def write_report(out: Path, size, temps, results, histories, unet, encode, backend, token_files, elapsed):
    """report.md, results.json, curves.png and grid.png in ``out``."""
    stats = {c: summarize(rows) for c, rows in results.items()}
    deltas = paired_deltas(results)
    (out / "results.json").write_text(json.dumps({"size": size.__dict__, "tau": temps[0], "temp": temps[1],
                                                  "seconds": round(elapsed), "per_seed": results,
                                                  "mean_std": stats, "paired_delta": deltas}, indent=1))
    plot_curves(out / "curves.png", histories)
    plot_grid(out / "grid.png", unet, encode, backend, token_files, size)
    cols = [k for k in stats["base"] if k.startswith("geneval_")] + ["align", "quality"]
    names = {"geneval_overall": "GenEval-mini overall", "align": "alignment score", "quality": "quality proxy"}
    head = "| | " + " | ".join(names.get(k, k.replace("geneval_", "")) for k in cols) + " |"
    lines = [head, "|---" * (len(cols) + 1) + "|"]
    for c in CONDITIONS:
        cells = [f"{stats[c][k][0]:.3f} ± {stats[c][k][1]:.3f}" for k in cols]
        lines.append(f"| {c} | " + " | ".join(cells) + " |")
    for c, d in deltas.items():
        cells = [f"{d[k][0]:+.3f} ± {d[k][1]:.3f}" for k in cols]
        lines.append(f"| {c} − base | " + " | ".join(cells) + " |")
    text = f"""# Soft-token demo report

Tiny text-to-image model (`training/assets/tiny_t2i`), frozen; tokens trained with the engine.
Seeds: {list(size.seeds)} (mean ± std over seeds). Wall time: {elapsed / 60:.1f} min.

{chr(10).join(lines)}

- "− base" rows: the change against the base model within each seed (same prompts, noise and
  pairs), mean ± std over seeds; a change within about one std of zero is noise.
- GenEval-mini columns: accuracy on {size.n_eval} held-out prompts per seed (colour and shape
  combinations never seen in pretraining), {size.sample_steps} DDIM steps, CFG 3; tokens in both branches.
  count: prompts of 2-{max(world.NUMBERS)} objects (as GenEval's counting); binding, position: two-object prompts.
- alignment score: diffusion-classifier top-1 accuracy on {size.n_val} held-out image-caption pairs,
  groups of 4 (chance 0.25), t in (100, 300, 500, 700, 900).
- quality proxy: share of pixels near black or a palette colour (ground-truth renders: 0.949).

Settings: {size.steps} steps, batch 4 images (16 pairs), 4 tokens on down + mid blocks, null-text
(BOS) init, lr {size.lr:g} (official 1e-3 is for runs of tens of thousands of steps; at 1e-3 the
tokens barely moved in 300 steps). Temperatures calibrated to this model's error scale (official 0.07 / 0.1
assume Stable Diffusion's): SoftREPA tau = median(E) / 2 = {temps[0]:.2e}, so typical E / tau is about 2
as with SD; AGSM T = median within-row spread of E = {temps[1]:.2e}. AGSM EMA decay {size.ema_decay}
(official 0.9999 lags ~10k steps, longer than these runs).

![curves](curves.png)

![samples](grid.png)

Grid rows: base, SoftREPA, AGSM (seed {size.seeds[0]}); same prompts and noise in every row.
"""
    (out / "report.md").write_text(text)


def plot_curves(path, histories):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (a, b) = plt.subplots(1, 2, figsize=(10, 3.6))
    colors = {"softrepa": "tab:blue", "agsm": "tab:orange"}
    for (method, seed), h in sorted(histories.items()):
        losses = [(r["step"], r["loss"]) for r in h["steps"] if r["loss"] is not None]
        if losses:
            s, l = zip(*losses)
            k = max(1, len(l) // 30)
            smooth = np.convolve(l, np.ones(k) / k, mode="valid")
            a.plot(s[k - 1:], smooth, color=colors[method], alpha=0.7, label=f"{method} s{seed}")
        if h["val"]:
            b.plot([v["step"] for v in h["val"]], [v["accuracy"] for v in h["val"]], color=colors[method],
                   alpha=0.7, marker="o", ms=3, label=f"{method} s{seed}")
            b.axhline(h["val"][0]["accuracy_base"], color="gray", ls="--", lw=1)
    a.set(title="training loss (smoothed)", xlabel="step")
    b.set(title="validation alignment score (dashed: base)", xlabel="step")
    for ax in (a, b):
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def plot_grid(path, unet, encode, backend, token_files, size, n: int = 8):
    """Rows base / SoftREPA / AGSM for the same n held-out prompts and sampling noise."""
    from PIL import Image

    from ..formats import load_tokens

    seed = size.seeds[0]
    specs = world.sample_specs(20_000, n, "heldout")
    prompts = [s.caption for s in specs]
    rows = [pretrain.sample(unet, encode, prompts, seed=seed, steps=size.sample_steps)]
    for method in ("softrepa", "agsm"):
        tok = load_tokens(token_files[(method, seed)])
        rows.append(pretrain.sample(unet, encode, prompts, seed=seed, steps=size.sample_steps,
                                    tokens_injector=backend.use_tokens(tok)))
    grid = torch.cat([torch.cat(list(r), dim=2) for r in rows], dim=1)  # (3, 3*32, n*32)
    arr = ((grid.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
    Image.fromarray(arr).resize((arr.shape[1] * 3, arr.shape[0] * 3), Image.NEAREST).save(path)
    (Path(path).with_suffix(".txt")).write_text("\n".join(f"column {i + 1}: {p}" for i, p in enumerate(prompts)))
