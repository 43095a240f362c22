"""``python -m training demo``: SoftREPA and AGSM tokens trained and measured on the tiny world.

The shipped tiny text-to-image model (``training/assets/tiny_t2i``) is the frozen backbone.
The demo uses the engine exactly as a user would (a ``DiffusersBackend`` around the UNet, the
``Trainer``, the alignment score) and is evaluated the way the papers evaluate:

1. a diagnostic first (``diagnostic.py``): per category, does the base model *know* the
   distinction (diffusion classifier on near-miss captions) while it *draws* it poorly?
2. per seed, SoftREPA and AGSM tokens trained on batches of near-miss groups (``batches.py``),
   then base, base at a higher CFG scale, SoftREPA and AGSM measured on prompts of the token
   training distribution with fresh renders and noise (the main rows: GenEval-mini, alignment
   score, a quality proxy), and on held-out combinations (the generalisation rows); on the main
   rows also step-selected refinement (``refinement.py``) alone and on top of SoftREPA's tokens;
3. a report folder: ``report.md`` (diagnostic, tables with paired per-seed changes, every
   setting that differs from the papers and why), ``curves.png``, ``grid.png``,
   ``results.json`` and the token files.

Temperatures are calibrated to the model's error scale (``calibrate_temperatures``); AGSM's EMA
decay, the learning rate, the batch composition and the sampler steps are scaled to runs of a
few hundred steps on a CPU (the report's settings table says how and why).
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np
import torch

from ..diffusers_backend import DiffusersBackend
from ..formats import load_tokens
from ..layouts import TokenLayout
from ..pairs import pair_errors
from ..score import alignment_score
from ..trainer import TensorData, TrainConfig, bos_init, train
from . import pretrain, world
from .batches import NearMissData
from .diagnostic import DEFAULT_K, diagnose, fair_targets, stratified_timesteps
from .geneval_mini import CATEGORIES, count_misses, evaluate
from .refinement import DEFAULT_SETTINGS, DEFAULT_STEP, GRID, Refiner

# base_cfg: the base model at a higher CFG scale; refine: base + step-selected refinement at the swept step;
# both: SoftREPA tokens + that refinement (main rows only)
CONDITIONS = ("base", "base_cfg", "softrepa", "agsm", "refine", "both")
METHODS = ("softrepa", "agsm")
REFINED = {"refine": None, "both": "softrepa"}  # refined condition -> the tokens it samples with
# rows whose alignment score is another row's: the score samples nothing, so neither CFG nor refinement changes it
SAME_SCORE = {"base_cfg": "base", **{c: source or "base" for c, source in REFINED.items()}}


# Denoiser calls of about 128 images. On one thread (a demo worker) the tiny model ran calls of 16 images at 1.19x
# the time per image of 128, and 64-256 within a few percent of it (two 1-thread processes side by side, one run
# of bench/demo_workers.py)
SCORE_CHUNK = 128  # pairs per call when scoring (the alignment score, training's validation): 8 groups of 4 x 4
SAMPLE_BATCH = 64  # prompts per sampler call: 128 images with CFG

@dataclass(frozen=True)
class DemoSize:
    seeds: tuple = (0, 1, 2)
    steps: int = 300
    n_val: int = 64
    # 192 prompts left a per-seed spread of about +-0.06 in count and +-0.03 in overall, as large as the effects;
    # 320 fitted the 10-minute budget by the estimate made before the run (the last run's 7.7 min, plus 45 s per
    # seed for 192 -> 384 prompts, measured). In one process it took 12.6 min on a slow day (192 prompts, the
    # same day: 12.1); with two 1-thread workers and the refined rows' shared steps, 8.5 min the same day, with
    # the same results (one process takes 1.3x as long: bench/demo_workers.py)
    n_main: int = 320
    n_general: int = 96
    n_align: int = 192  # per seed, like n_main: enough pairs that the spread is below the effects reported
    n_diag: int = 96
    diag_k: int = DEFAULT_K  # timesteps of the diagnostic's classifier (diagnostic.DEFAULT_K)
    sample_steps: int = 12
    cfg: float = 3.0
    cfg_high: float = 6.0
    val_every: int = 100
    ema_decay: float = 0.99
    # Chosen on validation seeds 5-7 with 576 prompts per seed (SoftREPA, mean count / overall / alignment score
    # change). All t (0-999): 2e-2 +0.010 / +0.016 / +0.013 (with 192 prompts the same run had read +0.021 / +0.042:
    # evaluation noise). Tokens trained on t < t_max only: 300 +0.039 / +0.006 / +0.017, 500 +0.039 / +0.009 /
    # +0.019, 700 +0.036 / +0.010 / +0.011 (all at 2e-2); at t_max 500: 2.5e-2 +0.079 / +0.021 / +0.020 (every seed
    # up in all three; binding +0.001), 3e-2 +0.101 / +0.001 / +0.018 (binding -0.035, overall -0.049 in seed 7).
    # Restricted to low t the tokens mostly stop copies from merging (too few objects 0.56 -> 0.46 at 2.5e-2),
    # a late, fine-detail step; trained on all t they act like more guidance, which merges copies.
    lr: float = 2.5e-2
    t_max: int = 500  # tokens are trained on t < t_max (the papers: all t); see lr
    batches: str = "near-miss"
    # Near-miss groups per optimizer step, their gradients averaged (TrainConfig.accum). Chosen on the shipped model,
    # validation seeds 5-13 (320 prompts; SoftREPA count / overall / alignment score change): 1 group +0.060 /
    # +0.029 / +0.022 (count +0.000 and +0.008 in two seeds, alignment score +0.000 in one); 2 groups +0.092 / +0.047
    # / +0.025, overall and alignment score up in every seed. With one group the draw of groups alone moved a seed's
    # count change by about +-0.03 (tokens of one seed measured on other seeds' prompts). It took the full demo
    # from 7.4 to 9.7 min (2 workers, the machine alone; both methods train two groups per step).
    accum: int = 2
    count_share: float = 0.5  # near-miss batches: share of count groups (the rest: relation groups); 0.75 on
    # validation seeds 5-7 (first-phase model, all t, lr 2e-2, 192 prompts): count +0.011, overall +0.030, below 0.5's
    # +0.021 / +0.042
    # Other SoftREPA settings tried on validation seeds 5-7 (first-phase model, 192 prompts; mean count / overall /
    # alignment score change, against all t at 2e-2: +0.021 / +0.042 / +0.013): 600 steps +0.032 / +0.036 / +0.017; tokens in the up
    # blocks too +0.022 / +0.023 / +0.014; t >= 300 only +0.005 / +0.019 / -0.010; tau x0.5 +0.024 / +0.005 /
    # +0.006; tau x0.25 +0.020 / -0.002 / -0.005; tau x2 -0.015 / +0.038 / +0.023; tau x4 -0.091 / +0.012 / +0.031
    # (a larger tau trades count for alignment, like a higher CFG scale); the official SD1.5 scripts' diffusion
    # loss (dweight 10, scaled by 0.07 / tau to this error scale; x0.3 too) +0.030 / +0.023 / +0.000. None is
    # clearly better: the count change of seed 7 is negative in every setting (the same prompts and noise), so
    # the per-seed spread of the evaluation, not these settings, dominates.
    refine_step: int = DEFAULT_STEP  # step index of the sample_steps schedule (refinement.DEFAULT_STEP: swept)
    # 5, not the sweep's 10: at 10 the two refined rows took 14% of a full run (1 thread, busy machine),
    # 8.6 min -> 10.0 min extrapolated, over the 10-minute budget. At 5: 11% of a full run that took
    # 9.8 min alone on 2 cores (measured)
    refine_iterations: int = 5
    refine_scale: float = DEFAULT_SETTINGS.scale
    refine_loss: str = DEFAULT_SETTINGS.loss

    def refine_settings(self):
        return replace(DEFAULT_SETTINGS, iterations=self.refine_iterations, scale=self.refine_scale,
                       loss=self.refine_loss)


FULL = DemoSize()
SMOKE = DemoSize(seeds=(0,), steps=12, n_val=16, n_main=16, n_general=8, n_align=16, n_diag=8, diag_k=5,
                 sample_steps=4, val_every=6, refine_step=DEFAULT_STEP * 4 // 12, refine_iterations=2)
LONG = replace(FULL, seeds=(0,), steps=3000)


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


def token_data(encode, x_train, c_train, size: DemoSize, seed: int):
    """The Trainer's data: near-miss groups (fresh renders of train-split captions) or random batches."""
    if size.batches == "near-miss":
        return NearMissData(encode, batch=4, seed=seed, p_count=size.count_share)
    return TensorData(x_train, c_train, 4, seed=seed)


def drawn_metrics(images: torch.Tensor, specs, part: str = "") -> dict:
    """GenEval-mini per category, how counting fails and the quality proxy of sampled images."""
    acc, _, found = evaluate(images, specs, details=True)
    out = {f"{part}count_{k}": v for k, v in count_misses(found, specs).items()}
    # NaN where no prompt of a category was drawn (possible in tiny runs), so every row has every key
    out.update({f"{part}geneval_{k}": acc.get(k, float("nan")) for k in CATEGORIES})
    out[f"{part}quality"] = clean_pixel_rate(images)
    return out


def measure(unet, encode, backend, tokens, evals: dict, size: DemoSize, seed: int, cfg: float,
            general: bool = True, refine=None, score: bool = True):
    """Main (same-distribution) and, with ``general``, generalisation metrics for tokens (or None) at ``cfg``.

    Main: GenEval-mini on ``n_main`` train-split captions with fresh renders and noise (as the
    papers: prompts of the token-training kind, never used in training) and the alignment score
    on fresh train-split pairs. Generalisation: the same on held-out combinations.
    refine: a ``refinement.Refiner``: returns (metrics, refined main metrics), the refined images
    sampled from the same prompts and noise (the steps before the refined one run once). score:
    False leaves out the alignment score. Rows in ``SAME_SCORE`` have none of their own: the score
    samples nothing, so neither CFG nor refinement changes it.
    """
    out, refined = {}, None
    for part, split, n, pairs in (("", "train", size.n_main, evals["main"]),
                                  ("general_", "heldout", size.n_general, evals["general"])):
        if part and not general:
            continue
        specs = world.sample_specs(10_000 + seed, n, split)
        ctx = backend.use_tokens(tokens) if tokens is not None else None
        kw = dict(seed=seed, steps=size.sample_steps, cfg=cfg, tokens_injector=ctx, batch=SAMPLE_BATCH)
        if refine is not None and not part:
            images_refined, images = pretrain.sample(unet, encode, [s.caption for s in specs], refine=refine,
                                                     unrefined=True, **kw)
            refined = drawn_metrics(images_refined, specs)
        else:
            images = pretrain.sample(unet, encode, [s.caption for s in specs], **kw)
        out.update(drawn_metrics(images, specs, part))
        if score:
            key = "accuracy" if tokens is not None else "accuracy_base"
            out[f"{part}align"] = alignment_score(backend, tokens, pairs[0], pairs[1], base=tokens is None,
                                                  seed=seed, chunk=SCORE_CHUNK)[key]
    return out if refine is None else (out, refined)


@dataclass
class Setup:
    """What every job uses: the frozen model and the fixed data (a deterministic function of the
    model and the size, so each worker process rebuilds it identically)."""
    unet: object
    encode: object
    backend: DiffusersBackend
    x_train: torch.Tensor
    c_train: dict
    val: tuple
    evals: dict  # {seed: {"main": pairs, "general": pairs}}: the alignment pairs, fresh renders per seed

    @classmethod
    def load(cls, size: DemoSize, model=None) -> "Setup":
        unet, encode = pretrain.load_tiny_t2i(path=model)
        backend = DiffusersBackend(unet, alphas_cumprod=pretrain.alphas_cumprod())
        x_train, c_train, _ = world_pairs(encode, 256, "train", seed=1)
        val = world_pairs(encode, size.n_val, "train", seed=2)[:2]  # validation: the training distribution
        # token training uses seed=1; the alignment pairs are drawn per seed, like the GenEval-mini prompts
        evals = {s: {"main": world_pairs(encode, size.n_align, "train", seed=20_000 + s)[:2],
                     "general": world_pairs(encode, size.n_align, "heldout", seed=30_000 + s)[:2]}
                 for s in size.seeds}
        return cls(unet, encode, backend, x_train, c_train, val, evals)


def token_file(out: Path, method: str, seed: int) -> Path:
    return out / "tokens" / f"{method}_seed{seed}.safetensors"


# The jobs of one seed and the rows each one measures. A refined row comes from its unrefined row's job: the same
# prompts and noise, and the sampling steps before the refined one run once for both.
JOBS = {"softrepa": ("softrepa", "both"), "agsm": ("agsm",), "base": ("base", "refine"), "base_cfg": ("base_cfg",)}


def run_job(setup: Setup, size: DemoSize, seed: int, job: str, temps: tuple, out: Path,
            progress: bool = False) -> dict:
    """One job of one seed (``JOBS``): train its tokens (SoftREPA, AGSM) and measure its rows.

    Returns {"metrics": {row: metrics}, "seconds": wall seconds} and, after training, "history".
    Rows in ``SAME_SCORE`` get no alignment score here: ``run_demo`` copies it.
    """
    unet, encode, backend = setup.unet, setup.encode, setup.backend
    t0 = time.time()
    tokens, done = None, {}
    if job in METHODS:
        width = setup.c_train["context"].shape[-1]
        layout = TokenLayout(arch="sd15", method=job, n_tokens=4, width=width, text_width=width,
                             blocks=("down", "mid"))
        cfg = TrainConfig(steps=size.steps, batch=4, accum=size.accum, lr=size.lr, val_every=size.val_every, ckpt_every=0,
                          tau=temps[0], temp=temps[1], ema_decay=size.ema_decay, score_group=4, t_max=size.t_max,
                          chunk=SCORE_CHUNK, method=job, seed=seed)
        res = train(backend, layout, token_data(encode, setup.x_train, setup.c_train, size, seed), cfg,
                    token_file(out, job, seed), val=setup.val, init_static=bos_init(encode([""])), overwrite=True,
                    progress=progress, meta={"model": "tiny_t2i (demo)", "data": f"demo world, {size.batches} batches"})
        tokens, done["history"] = res.tokens, res.history
    rows = JOBS[job]
    refined = next((r for r in rows if r in REFINED), None)
    refiner = None if refined is None else Refiner(
        unet, encode.tokenizer, step=size.refine_step, settings=size.refine_settings(),
        token_layout=tokens.layout if tokens is not None else None)
    m = measure(unet, encode, backend, tokens, setup.evals[seed], size, seed,
                cfg=size.cfg_high if job == "base_cfg" else size.cfg, general=job != "base_cfg", refine=refiner,
                score=rows[0] not in SAME_SCORE)
    done["metrics"] = {rows[0]: m[0], refined: m[1]} if refined else {rows[0]: m}
    done["seconds"] = time.time() - t0
    return done


def run_diagnostic(setup: Setup, size: DemoSize) -> dict:
    """The near-miss diagnostic of the base model (``diagnostic.diagnose``) at the size's settings."""
    return diagnose(setup.backend, setup.encode, n=size.n_diag, split="train", ts=stratified_timesteps(size.diag_k))


_WORKER = {}  # a worker process's Setup and size, built once by _init_worker


def _init_worker(size: DemoSize, model, threads: int) -> None:
    torch.set_num_threads(threads)
    _WORKER["size"], _WORKER["setup"] = size, Setup.load(size, model)


def _worker_job(seed, job: str, temps: tuple, out: Path):
    setup, size = _WORKER["setup"], _WORKER["size"]
    if job == "diagnostic":
        return run_diagnostic(setup, size)
    return run_job(setup, size, seed, job, temps, out)


def run_demo(out_dir="demo_report", size: DemoSize = FULL, progress: bool = True, model=None,
             workers: int = 1) -> Path:
    """Diagnose the base model, train and measure both methods over ``size.seeds``; write the report.

    model: a tiny_t2i folder (default: the shipped one). workers: processes that run the jobs (the
    diagnostic, then ``JOBS`` for each seed) side by side, each with torch.get_num_threads() //
    workers threads; 1 runs them here. The tiny model keeps the second thread of a process half
    idle, so on 2 cores two 1-thread workers are faster (bench/demo_workers.py). Every job is
    seeded on its own, so results do not depend on where or in which order jobs run.
    """
    from tqdm.auto import tqdm

    if workers < 1:
        raise ValueError(f"workers must be at least 1, got {workers}")
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    t_start = time.time()
    setup = Setup.load(size, model)
    temps = calibrate_temperatures(setup.backend, setup.x_train, setup.c_train)

    # the longest jobs first, so that no worker idles long at the end
    jobs = [(None, "diagnostic")] + [(s, j) for j in JOBS for s in size.seeds]
    bar = tqdm(total=len(jobs), desc="demo", unit="job", disable=not progress)
    done = {}
    if workers == 1:
        for seed, job in jobs:
            bar.set_postfix(seed=seed, run=job)
            done[seed, job] = (run_diagnostic(setup, size) if job == "diagnostic"
                               else run_job(setup, size, seed, job, temps, out, progress))
            bar.update(1)
    else:
        import multiprocessing
        from concurrent.futures import ProcessPoolExecutor, as_completed

        threads = max(1, torch.get_num_threads() // workers)
        # spawn, not fork: a forked copy of a process whose OpenMP pool has run can hang
        pool = ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn"),
                                   initializer=_init_worker, initargs=(size, model, threads))
        try:
            futures = {pool.submit(_worker_job, s, j, temps, out): (s, j) for s, j in jobs}
            for f in as_completed(futures):
                done[futures[f]] = f.result()  # a job's error stops the demo here
                bar.set_postfix(seed=futures[f][0], run=futures[f][1])
                bar.update(1)
        finally:  # on an error or Ctrl-C no queued job starts; running ones end (Ctrl-C reaches them too)
            pool.shutdown(wait=True, cancel_futures=True)
    bar.close()
    diag = done.pop((None, "diagnostic"))
    results, histories, token_files = {c: [] for c in CONDITIONS}, {}, {}
    for seed in size.seeds:
        rows = {r: m for j in JOBS for r, m in done[seed, j]["metrics"].items()}
        for cond in CONDITIONS:
            if cond in SAME_SCORE:
                rows[cond]["align"] = rows[SAME_SCORE[cond]]["align"]
            results[cond].append(rows[cond])
        for method in METHODS:
            histories[method, seed], token_files[method, seed] = done[seed, method]["history"], token_file(out, method, seed)
    seconds = {j: sum(done[s, j]["seconds"] for s in size.seeds) for j in JOBS}
    elapsed = time.time() - t_start
    write_report(out, size, temps, diag, results, histories, setup.unet, setup.encode, setup.backend, token_files,
                 elapsed, seconds, workers)
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
    return {c: summarize([{k: r[k] - b[k] for k in r if k in b} for r, b in zip(results[c], results["base"])])
            for c in results if c != "base"}


NAMES = {"geneval_overall": "GenEval-mini overall", "align": "alignment score", "quality": "quality proxy"}
LABELS = {"base": "base (CFG {cfg:g})", "base_cfg": "base at CFG {cfg_high:g}", "softrepa": "SoftREPA",
          "agsm": "AGSM", "refine": "refinement (step {refine_step})", "both": "SoftREPA + refinement"}


def label(c: str, size) -> str:
    return LABELS[c].format(cfg=size.cfg, cfg_high=size.cfg_high, refine_step=size.refine_step)


def table(stats: dict, deltas: dict, conditions, prefix: str, size) -> str:
    """A markdown table of mean ± std rows and paired "− base" rows for the metrics with ``prefix``."""
    cols = [f"{prefix}geneval_{k}" for k in CATEGORIES] + [f"{prefix}align", f"{prefix}quality"]
    head = "| | " + " | ".join(NAMES.get(k[len(prefix):], k[len(prefix):].replace("geneval_", "")) for k in cols)
    lines = [head + " |", "|---" * (len(cols) + 1) + "|"]
    for c in conditions:
        lines.append(f"| {label(c, size)} | " + " | ".join(f"{stats[c][k][0]:.3f} ± {stats[c][k][1]:.3f}" for k in cols) + " |")
    for c in conditions:
        if c != "base":
            lines.append(f"| {label(c, size)} − base | "
                         + " | ".join(f"{deltas[c][k][0]:+.3f} ± {deltas[c][k][1]:.3f}" for k in cols) + " |")
    return "\n".join(lines)


def per_seed_line(results: dict, method: str, key: str, against: str = "base") -> str:
    """"+0.031, -0.010, ..." : the paired change of one metric in every seed."""
    return ", ".join(f"{r[key] - b[key]:+.3f}" for r, b in zip(results[method], results[against]))


def write_report(out: Path, size, temps, diag, results, histories, unet, encode, backend, token_files, elapsed,
                 seconds: dict | None = None, workers: int = 1):
    """report.md, results.json, curves.png and grid.png in ``out``."""
    stats = {c: summarize(rows) for c, rows in results.items()}
    deltas = paired_deltas(results)
    base_geneval = {k: stats["base"][f"geneval_{k}"][0] for k in CATEGORIES}
    targets = fair_targets(diag, base_geneval)
    (out / "results.json").write_text(json.dumps({"size": size.__dict__, "tau": temps[0], "temp": temps[1],
                                                  "seconds": round(elapsed), "workers": workers, "diagnostic": diag,
                                                  "job_seconds": {k: round(v, 1) for k, v in
                                                                  (seconds or {}).items()},
                                                  "fair_targets": targets, "per_seed": results,
                                                  "mean_std": stats, "paired_delta": deltas}, indent=1))
    plot_curves(out / "curves.png", histories)
    plot_grid(out / "grid.png", unet, encode, backend, token_files, size)
    diag_lines = ["| category | classifier on near misses (± s.e.) | chance | drawn (GenEval-mini, base) "
                  "| fair target |",
                  "|---|---|---|---|---|"]
    for c, d in diag.items():
        diag_lines.append(f"| {c} | {d['accuracy']:.3f} ± {d['se']:.3f} | {d['chance']:.3f} | "
                          f"{base_geneval[c]:.3f} | {'yes' if c in targets else 'no'} |")
    seeds = "\n".join(f"- {LABELS[m]}: count {per_seed_line(results, m, 'geneval_count')}; overall "
                      f"{per_seed_line(results, m, 'geneval_overall')}; alignment score "
                      f"{per_seed_line(results, m, 'align')}" for m in METHODS)
    seeds += "\n" + "\n".join(f"- {label(m, size)}: count {per_seed_line(results, m, 'geneval_count')}; overall "
                               f"{per_seed_line(results, m, 'geneval_overall')}; binding "
                               f"{per_seed_line(results, m, 'geneval_binding')}; position "
                               f"{per_seed_line(results, m, 'geneval_position')}" for m in REFINED)
    seeds += (f"\n- SoftREPA + refinement against SoftREPA alone: overall "
              f"{per_seed_line(results, 'both', 'geneval_overall', 'softrepa')}; count "
              f"{per_seed_line(results, 'both', 'geneval_count', 'softrepa')}")
    misses = "\n".join(f"| {label(c, size)} | {stats[c]['count_fewer'][0]:.3f} ± {stats[c]['count_fewer'][1]:.3f} | "
                       f"{stats[c]['count_more'][0]:.3f} ± {stats[c]['count_more'][1]:.3f} |" for c in CONDITIONS)
    ts = stratified_timesteps(size.diag_k)
    diag_ts = ", ".join(map(str, ts)) if len(ts) <= 5 else f"{ts[0]}, {ts[1]}, ..., {ts[-1]}"
    rs = size.refine_settings()
    t_ref = pretrain.ddim_timesteps(size.sample_steps)[size.refine_step]
    text = f"""# Soft-token demo report

Tiny text-to-image model (`training/assets/tiny_t2i`), frozen; tokens trained with the engine.
Seeds: {list(size.seeds)} (mean ± std over seeds). Wall time: {elapsed / 60:.1f} min ({workers} worker
process{"es" if workers > 1 else ""}).

## Where the signal is (before any token training)

The base model's diffusion classifier on near-miss caption groups: a ground-truth render of a
caption against captions that differ only in that category (error summed over {size.diag_k} timesteps
t = {diag_ts}; {size.n_diag} training-distribution images per category; ± its standard error),
beside how well the model draws that category. Soft tokens are the same for every prompt, so
they can only amplify a distinction the model already makes: a category is a fair target when
the classifier is well above chance (by 0.1 here) and the drawn score is low (≤ 0.6).

{chr(10).join(diag_lines)}

## Main result: prompts of the training distribution (as the papers evaluate)

{size.n_main} prompts per seed drawn like the token-training captions, with fresh renders and
fresh sampling noise that token training never saw; the same prompts and noise in every row.

{table(stats, deltas, CONDITIONS, "", size)}

Paired change per seed (same prompts and noise):
{seeds}

### How counting fails

Share of the main rows' count prompts (two or more objects) drawn with too few and with too many
objects. Copies drawn touching merge into one object for the evaluator, so "too few" includes
merged copies.

| | too few | too many |
|---|---|---|
{misses}

## Generalisation: held-out colour-shape combinations

{size.n_general} prompts per seed whose attribute combinations never appeared in pretraining or token training.

{table(stats, deltas, ("base", "softrepa", "agsm"), "general_", size)}

## How to read it

- "− base" rows: the change against the base model within each seed, mean ± std over seeds; a
  change within about one std of zero is noise.
- GenEval-mini: {size.sample_steps} DDIM steps, CFG {size.cfg:g}; tokens in both CFG branches. count:
  prompts of 2-{max(world.NUMBERS)} objects (as GenEval's counting); binding, position: two-object prompts.
- "base at CFG {size.cfg_high:g}": the fair alternative to tokens: the plain model with stronger guidance.
  Its alignment score is the base row's: the score scores captions and uses no guidance.
- refinement: step-selected semantic refinement (IterRef at one denoising step, see the README):
  at step index {size.refine_step} of {size.sample_steps} (t = {t_ref}), {rs.iterations} gradient steps on the
  latent against the attention-map loss of the caption's shape words, then sampling goes on.
  Main rows only. Its alignment score is the unrefined row's (the score samples nothing).
- alignment score: diffusion-classifier top-1 accuracy on {size.n_align} image-caption pairs per seed of that
  distribution, groups of 4 (chance 0.25), t in (100, 300, 500, 700, 900).
- quality proxy: share of pixels near black or a palette colour (ground-truth renders: 0.949).

## Settings that differ from the papers' defaults, and why

| setting | here | papers / official code | why |
|---|---|---|---|
| SoftREPA τ | {temps[0]:.2e} (median error / 2) | 0.07 | τ = 0.07 assumes Stable Diffusion's error scale (typical E/τ ≈ 2); this model's errors are smaller, so τ is calibrated on the base model to the same E/τ |
| AGSM softmax temperature T | {temps[1]:.2e} (median within-row error spread) | 0.1 | same reason: the weights only see error differences, which T must put at O(1) |
| AGSM EMA decay | {size.ema_decay} | 0.9999 | 0.9999 lags ~10k steps; these runs are {size.steps} steps |
| learning rate | {size.lr:g} | 1e-3 | runs of {size.steps} steps, not tens of thousands (at 1e-3 the tokens barely moved); chosen with the timestep range on validation seeds 5-7, 576 prompts per seed (SoftREPA count / overall change at t < 500: 2e-2 +0.039 / +0.009, 2.5e-2 +0.079 / +0.021, 3e-2 +0.101 / +0.001 with binding −0.035) |
| training timesteps | t < {size.t_max} | all t (official defaults min_t 0, max_t 1000) | on all t (lr 2e-2) the tokens acted like more guidance and merged counted copies (validation: count +0.010); on t < 300 / 500 / 700: +0.039 / +0.039 / +0.036, mostly fewer merged copies. The static tokens (trained on t < {size.t_max}) act at every t; the time-table rows of higher t keep their small random initialisation |
| batch composition | {size.batches}: each batch of 4 images is one near-miss group (an object at counts 1-4, or two objects with colours swapped, shapes swapped and the relation flipped); count groups {size.count_share:.0%} of the batches; each optimizer step averages the gradients of {size.accum} such groups (each its own 4 x 4 matrix, t and noise) | random captions, one batch per step | random batches of this world differ mostly in colour and shape, which the model already draws right; near-miss batches put the hard distinctions into the contrastive matrix. One group per step left the gain to the draw of groups: on validation seeds 5-13 two groups per step raised SoftREPA's count change from +0.060 to +0.092 and overall from +0.029 to +0.047, up in every seed |
| blocks, tokens | down + mid, 4 tokens, BOS init, B = 4 (16 pairs) | the same (SD1.5 SoftREPA: down only) | AGSM's UNet choice, used for both |
| sampling | {size.sample_steps} DDIM steps | 50 (SD) | keeps the demo within 10 minutes on 2 CPU cores |
| refinement step | index {size.refine_step} of {size.sample_steps} (t = {t_ref}) | SD1.4: t = 821 or 941 of 50 DDPM steps | chosen the papers' way, on validation prompts (`python -m training refine-sweep`: train-split captions, seeds disjoint from these rows) |
| refinement iterations, loss | {rs.iterations}, {rs.loss} (threshold {rs.threshold:g}: every iteration runs) | unknown (A&E: 20; official default loss cn+iou) | cost: at the sweep's 10 iterations the two refined rows pushed the demo past 10 minutes |
| refinement step size | {rs.scale:g} · sqrt(linspace({rs.scale_range[0]:g}, {rs.scale_range[1]:g}, {size.sample_steps})[i]) | 20 · sqrt(linspace(1, 0.5, 50)[i]) | at 20 the loss on this model moves < 1% in 10 iterations; chosen on the validation prompts (200 of 20/200/1000/5000) |
| attention maps | {GRID[0]}×{GRID[1]} cross-attention (down block 1, up block 1), subjects = shape words, window drops BOS and the last position | 16×16 (latent / 4), subjects = object nouns | the tiny model's latent is 16×16; 8×8 is its SD1.5-like grid (4×4 cannot say where two shapes are) |

![curves](curves.png)

![samples](grid.png)

Grid rows: base, SoftREPA, AGSM, refinement (seed {size.seeds[0]}); same prompts and noise in every row.
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
    """Rows base / SoftREPA / AGSM / refinement for the same n prompts and sampling noise."""
    from PIL import Image

    seed = size.seeds[0]
    specs = world.sample_specs(20_000, n, "train")
    prompts = [s.caption for s in specs]
    rows = [pretrain.sample(unet, encode, prompts, seed=seed, steps=size.sample_steps, cfg=size.cfg)]
    for method in ("softrepa", "agsm"):
        tok = load_tokens(token_files[(method, seed)])
        rows.append(pretrain.sample(unet, encode, prompts, seed=seed, steps=size.sample_steps, cfg=size.cfg,
                                    tokens_injector=backend.use_tokens(tok)))
    rows.append(pretrain.sample(unet, encode, prompts, seed=seed, steps=size.sample_steps, cfg=size.cfg,
                                refine=Refiner(unet, encode.tokenizer, step=size.refine_step,
                                               settings=size.refine_settings())))
    grid = torch.cat([torch.cat(list(r), dim=2) for r in rows], dim=1)  # (3, 4 rows * 32, n * 32)
    arr = ((grid.clamp(-1, 1) + 1) * 127.5).round().byte().permute(1, 2, 0).numpy()
    Image.fromarray(arr).resize((arr.shape[1] * 3, arr.shape[0] * 3), Image.NEAREST).save(path)
    (Path(path).with_suffix(".txt")).write_text("\n".join(f"column {i + 1}: {p}" for i, p in enumerate(prompts)))
