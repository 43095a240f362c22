"""Distributed training on CPU (gloo): time per step and peak memory per rank, 1 vs 2 processes.

The same global batch (B images x B captions, SoftREPA) is trained by
- 1 process with 1 thread,
- 1 process with 2 threads (the same cores as two 1-thread ranks),
- 2 processes (torch.multiprocessing + gloo, the engine ``torchrun`` drives) with 1 thread each,
interleaved round by round in one run, so machine load affects them alike. Each configuration
runs ``--steps`` steps of the real Trainer in fresh processes; time per step is the median over
the steps after the first (rank 0's clock), and the fastest round is kept. Peak memory is each
rank's ru_maxrss, and its growth over the rank's RSS before the first step (the step's own
memory). The bytes all-reduced per step are the token gradient (fp32) plus one loss value,
printed for this bench's tokens and for every family's default tokens.

    python bench/distributed_training.py [--batch 8] [--steps 6] [--rounds 3] [--latent 16]
"""

from __future__ import annotations

import argparse
import os
import resource
import statistics
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

WIDTH = 64


def rss_mb() -> float:
    """Current resident set size of this process in MB (Linux /proc)."""
    with open("/proc/self/statm") as f:
        return int(f.read().split()[1]) * os.sysconf("SC_PAGE_SIZE") / 2 ** 20


def build(latent: int, batch: int):
    """Bench backend, token layout and data (frozen random UNet, fixed seeds)."""
    import torch
    from diffusers import UNet2DConditionModel

    from training.diffusers_backend import DiffusersBackend
    from training.layouts import TokenLayout
    from training.trainer import TensorData

    torch.manual_seed(0)
    model = UNet2DConditionModel(
        sample_size=latent, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(32, 64),
        norm_num_groups=8, attention_head_dim=8, cross_attention_dim=WIDTH,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"))
    lay = TokenLayout(arch="sd15", method="softrepa", n_tokens=4, width=WIDTH, text_width=WIDTH,
                      blocks=("down", "mid"), time_buckets=100)
    g = torch.Generator().manual_seed(2)
    x0 = torch.randn(batch, 4, latent, latent, generator=g)
    cond = {"context": torch.randn(batch, 77, WIDTH, generator=g)}
    return DiffusersBackend(model), lay, TensorData(x0, cond, batch, seed=1)


def rank_main(rank: int, world: int, threads: int, args, tmp: str, queue) -> None:
    """One rank (or the single process): train ``args.steps`` steps, report timings and memory."""
    import torch

    from training.distributed import Dist
    from training.trainer import TrainConfig, Trainer

    torch.set_num_threads(threads)
    dist = Dist(rank, world, rank)
    if dist.enabled:
        torch.distributed.init_process_group("gloo", init_method=f"file://{tmp}/store", rank=rank, world_size=world)
    backend, lay, data = build(args.latent, args.batch)
    cfg = TrainConfig(method="softrepa", steps=args.steps, batch=args.batch, val_every=10 ** 6, ckpt_every=0,
                      chunk=args.chunk)
    stamps = []
    trainer = Trainer(backend, lay, data, cfg, os.path.join(tmp, "t.safetensors"), progress=False, dist=dist,
                      on_step=lambda *a: stamps.append(time.perf_counter()))
    before = rss_mb()
    stamps.append(time.perf_counter())
    trainer.run()
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024  # Linux: KiB
    steps = [b - a for a, b in zip(stamps[1:], stamps[2:])]  # after the first step
    queue.put({"rank": rank, "step_s": statistics.median(steps), "peak_mb": peak, "step_mb": peak - before})
    if dist.enabled:
        torch.distributed.destroy_process_group()


def measure(world: int, threads: int, args) -> dict:
    """Run one configuration in fresh processes; rank 0's time per step, every rank's memory."""
    import torch.multiprocessing as mp

    ctx = mp.get_context("spawn")
    queue = ctx.Queue()
    with tempfile.TemporaryDirectory() as tmp:
        procs = [ctx.Process(target=rank_main, args=(r, world, threads, args, tmp, queue)) for r in range(world)]
        for p in procs:
            p.start()
        results = [queue.get(timeout=1800) for _ in procs]
        for p in procs:
            p.join()
            if p.exitcode != 0:
                raise RuntimeError(f"a rank failed (exit code {p.exitcode})")
    results.sort(key=lambda r: r["rank"])
    return {"step_s": results[0]["step_s"], "peak_mb": max(r["peak_mb"] for r in results),
            "step_mb": max(r["step_mb"] for r in results)}


def allreduce_bytes(lay) -> int:
    """Bytes one rank all-reduces per step: the fp32 token gradient plus the loss."""
    import math

    n = math.prod(lay.static_shape) + (math.prod(lay.time_shape) if lay.time_shape else 0)
    return 4 * (n + 1)


def family_table() -> list:
    """(family, method, all-reduced bytes per step) for every family's default tokens."""
    from training.layouts import ARCH_NAMES, TokenLayout, default_blocks, uses_time_table

    widths = {"sd15": 768, "sd2": 1024, "sdxl": 2048, "sd3": 1536, "sd35": 2432, "flux": 3072}
    rows = []
    for arch, width in widths.items():
        for method in ("softrepa", "agsm"):
            lay = TokenLayout(arch=arch, method=method, n_tokens=4, width=width, text_width=width,
                              blocks=default_blocks(arch, method),
                              time_buckets=100 if uses_time_table(arch, method) else 0)
            rows.append((ARCH_NAMES[arch], method, allreduce_bytes(lay)))
    return rows


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--batch", type=int, default=8, help="global batch B (B*B pairs per step)")
    p.add_argument("--steps", type=int, default=6, help="steps per measurement (the first is not timed)")
    p.add_argument("--rounds", type=int, default=3, help="interleaved rounds; the fastest is kept")
    p.add_argument("--latent", type=int, default=16, help="latent side")
    p.add_argument("--chunk", type=int, default=None, help="pairs per denoiser call on each rank")
    args = p.parse_args()
    if args.steps < 2:
        p.error("--steps must be at least 2 (the first step is not timed)")
    configs = {"1 process x 1 thread": (1, 1), "1 process x 2 threads": (1, 2), "2 processes x 1 thread": (2, 1)}
    best = {}
    for r in range(args.rounds):
        for name, (world, threads) in configs.items():
            res = measure(world, threads, args)
            if name not in best or res["step_s"] < best[name]["step_s"]:
                best[name] = res
            print(f"round {r + 1}: {name}: {res['step_s']:.3f} s/step", flush=True)
    _, lay, _ = build(args.latent, args.batch)
    ref = best["1 process x 1 thread"]["step_s"]
    print(f"\nSoftREPA, global B={args.batch} ({args.batch ** 2} pairs/step), latent {args.latent}x{args.latent}, "
          f"chunk {args.chunk}, {args.steps} steps, fastest of {args.rounds} rounds")
    print(f"{'configuration':26s} {'s/step':>8s} {'vs 1x1':>7s} {'peak MB/rank':>13s} {'step MB/rank':>13s}")
    for name, res in best.items():
        print(f"{name:26s} {res['step_s']:8.3f} {res['step_s'] / ref:7.2f} {res['peak_mb']:13.0f} "
              f"{res['step_mb']:13.0f}")
    print(f"\nall-reduced per step and rank: {allreduce_bytes(lay):,} bytes (this bench's tokens)")
    print("family defaults (4 tokens, official blocks and time table):")
    for fam, method, n in family_table():
        print(f"  {fam:7s} {method:9s} {n / 2 ** 20:7.2f} MiB")


if __name__ == "__main__":
    main()
