"""Peak memory and throughput of a SoftREPA step: naive all-pairs vs memory-bounded chunks.

B images x B prompts = B^2 denoiser passes per step. Three ways to run the same step (same
data, same loss, same gradient):
- naive:    all B^2 pairs in one denoiser call (chunk=None);
- rows:     chunks of whole image rows (chunk >= B), each backpropagated directly;
- two-pass: GradCache (errors without grad, closed-form dL/dE, recompute chunks with grad).

Peak memory: each step runs in a fresh subprocess, and its ru_maxrss minus that of a baseline
subprocess (same model and data, no step) is reported. Throughput: B^2 / wall time of a step,
measured in this process with the configs interleaved round by round (fastest round kept),
so machine load affects them alike. The tiny UNet runs at 16x16 latents with a 77-token
context, so activation memory dominates. At B=4 the chunk (16 pairs) holds every pair, so
both chunked configs run the naive step there (the "mode" column says what ran).

Targets: the chunked peak grows <= 1.5x from B=4 to B=16 (naive ~16x); chunked throughput is
>= 0.7x naive.

    python bench/training_memory.py [--sizes 4 8 16] [--chunk 16] [--rounds 3] [--threads 1]
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

CONFIGS = {"naive": {"chunk": False, "two_pass": None}, "rows": {"chunk": True, "two_pass": None},
           "two-pass": {"chunk": True, "two_pass": True}}


def build(B: int, latent: int, seed: int = 0):
    """The bench model (frozen, random weights), its backend, tokens and one batch."""
    import torch
    from diffusers import UNet2DConditionModel

    from training.diffusers_backend import DiffusersBackend
    from training.layouts import TokenLayout
    from training.tokens import SoftTokens

    torch.manual_seed(seed)
    model = UNet2DConditionModel(
        sample_size=latent, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        norm_num_groups=8, attention_head_dim=8, cross_attention_dim=64,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"))
    backend = DiffusersBackend(model)
    lay = TokenLayout(arch="sd15", method="softrepa", n_tokens=4, width=64, text_width=64, blocks=("down", "mid"))
    tokens = SoftTokens(lay, generator=torch.Generator().manual_seed(1))
    g = torch.Generator().manual_seed(2)
    x0 = torch.randn(B, 4, latent, latent, generator=g)
    cond = {"context": torch.randn(B, 77, 64, generator=g)}
    noise = torch.randn(1, 4, latent, latent, generator=g)
    return backend, tokens, x0, cond, noise


def step_kwargs(config: str, chunk: int) -> dict:
    cfg = CONFIGS[config]
    return {"chunk": chunk if cfg["chunk"] else None, "two_pass": cfg["two_pass"]}


def worker(args) -> None:
    """Peak memory of one step in this fresh process; prints a JSON line."""
    import torch

    from training.objectives import softrepa_step

    torch.set_num_threads(args.threads)
    backend, tokens, x0, cond, noise = build(args.B, args.latent)
    out = {"config": args.config, "B": args.B}
    if args.config != "baseline":
        res = softrepa_step(backend, tokens, x0, cond, 500, noise, **step_kwargs(args.config, args.chunk))
        out.update(mode=res["mode"], loss=res["loss"])
    out["maxrss_mb"] = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
    print(json.dumps(out), flush=True)


def measure_memory(config: str, B: int, args) -> dict:
    cmd = [sys.executable, os.path.abspath(__file__), "--worker", "--config", config, "--B", str(B),
           "--chunk", str(args.chunk), "--latent", str(args.latent), "--threads", str(args.threads)]
    res = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT)
    if res.returncode != 0:
        sys.exit(f"worker {config} B={B} failed:\n{res.stderr[-3000:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def measure_speed(B: int, args) -> dict:
    """Fastest wall time per config over interleaved rounds (the order rotates every round)."""
    import torch

    from training.objectives import softrepa_step

    backend, tokens, x0, cond, noise = build(B, args.latent)
    names = list(CONFIGS)
    best, grads = {}, {}
    for r in range(args.rounds + 1):  # round 0 is a warm-up
        for config in names[r % len(names):] + names[:r % len(names)]:
            tokens.zero_grad()
            t0 = time.perf_counter()
            softrepa_step(backend, tokens, x0, cond, 500, noise, **step_kwargs(config, args.chunk))
            dt = time.perf_counter() - t0
            grads[config] = torch.cat([tokens.static.grad.flatten(), tokens.time.grad.flatten()])
            if r:
                best[config] = min(best.get(config, dt), dt)
    ref = grads["naive"]
    diff = max(((g - ref).norm() / ref.norm()).item() for g in grads.values())
    return {"seconds": best, "grad_rel_diff": diff}


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--sizes", type=int, nargs="+", default=[4, 8, 16], help="images per step B")
    ap.add_argument("--chunk", type=int, default=16, help="pairs per denoiser call for the chunked configs")
    ap.add_argument("--latent", type=int, default=16, help="latent height and width")
    ap.add_argument("--threads", type=int, default=1,
                    help="torch threads (1: on a shared or busy machine OpenMP barriers dominate tiny models)")
    ap.add_argument("--rounds", type=int, default=2, help="timed rounds per B (fastest is kept)")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--config", default="baseline", help=argparse.SUPPRESS)
    ap.add_argument("--B", type=int, default=4, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        return worker(args)

    # Memory first: a child's ru_maxrss starts from its parent's high-water mark, so the
    # parent must stay small (no torch work here) while the children run.
    t_start = time.perf_counter()
    print(f"SoftREPA step, tiny UNet at {args.latent}x{args.latent} latents, chunk={args.chunk} pairs, "
          f"{args.threads} thread(s)")
    base = measure_memory("baseline", max(args.sizes), args)["maxrss_mb"]
    print(f"memory: fresh subprocess per measurement; baseline peak RSS (model + data, no step) {base:.0f} MB")
    rows = {}
    for B in args.sizes:
        for config in CONFIGS:
            r = measure_memory(config, B, args)
            r["peak_mb"] = r["maxrss_mb"] - base
            rows[config, B] = r

    import torch

    torch.set_num_threads(args.threads)
    print(f"speed: one process, configs interleaved, fastest of {args.rounds} rounds after a warm-up\n")
    for B in args.sizes:
        speed = measure_speed(B, args)
        for config in CONFIGS:
            rows[config, B]["pairs_per_s"] = B * B / speed["seconds"][config]
            rows[config, B]["grad_rel_diff"] = speed["grad_rel_diff"]

    print(f"{'config':<10}{'B':>4}{'pairs':>7}{'mode':>10}{'peak MB':>10}{'pairs/s':>10}{'vs naive':>10}{'loss':>12}")
    for B in args.sizes:
        for config in CONFIGS:
            r = rows[config, B]
            rel = r["pairs_per_s"] / rows["naive", B]["pairs_per_s"]
            print(f"{config:<10}{B:>4}{B * B:>7}{r['mode']:>10}{r['peak_mb']:>10.0f}{r['pairs_per_s']:>10.1f}"
                  f"{rel:>10.2f}{r['loss']:>12.6f}")
        print(f"{'':<10}{'':>4}  max relative gradient difference to naive: {rows['naive', B]['grad_rel_diff']:.1e}")
    lo, hi = min(args.sizes), max(args.sizes)
    print(f"\npeak growth B={lo} -> B={hi} (target: chunked <= 1.5x, naive ~{(hi / lo) ** 2:.0f}x):")
    for config in CONFIGS:
        print(f"  {config:<10}{rows[config, hi]['peak_mb'] / rows[config, lo]['peak_mb']:8.2f}x")
    print("throughput vs naive (target >= 0.7x):")
    for config in ("rows", "two-pass"):
        ratios = "  ".join(f"B={B}: {rows[config, B]['pairs_per_s'] / rows['naive', B]['pairs_per_s']:.2f}x"
                           f" ({rows[config, B]['mode']})" for B in args.sizes)
        print(f"  {config:<10}{ratios}")
    print(f"\ntotal bench time {time.perf_counter() - t_start:.0f} s")


if __name__ == "__main__":
    main()
