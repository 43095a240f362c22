"""Wall time of the soft-token demo with worker processes against one process, side by side.

The demo's tiny model (a 1.7M-parameter UNet on 16x16 latents) keeps the second thread of one
process half idle: a call of 16 pairs (a training step) runs about as fast on one thread as on
two. Two 1-thread worker processes, each running whole jobs (one condition of one seed), use
both cores. This runs a shortened demo (every seed and condition, fewer prompts and steps)
with ``workers=1`` (one process, --threads threads) and ``workers=2`` one after the other, and
checks both give the same results. It first times denoiser calls of the tiny model on one
thread by batch size, two processes side by side (what the demo's workers do), which is where
``run.SCORE_CHUNK`` and ``run.SAMPLE_BATCH`` come from.

    python bench/demo_workers.py [--repeats 1] [--threads 2]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from dataclasses import replace

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from training.demo import run  # noqa: E402

# every seed and condition of the full demo, at about a sixth of its work
SIZE = replace(run.FULL, steps=100, n_val=32, val_every=50, n_main=64, n_general=32, n_align=32, n_diag=32)
BATCHES = (16, 64, 128, 256, 512)


def demo_seconds(workers: int, out: str) -> float:
    t0 = time.perf_counter()
    run.run_demo(out, SIZE, progress=False, workers=workers)
    return time.perf_counter() - t0


def ms_per_image(_=None) -> dict:
    """{batch: ms per image} of no-grad denoiser calls of the tiny model on one thread."""
    from training.demo import pretrain

    torch.set_num_threads(1)
    unet, encode = pretrain.load_tiny_t2i()
    c = encode(["two red circles"])
    out = {}
    with torch.no_grad():
        for n in BATCHES:
            x, cc, t = torch.randn(n, 12, 16, 16), c.expand(n, -1, -1).contiguous(), torch.full((n,), 500)
            unet(x, t, encoder_hidden_states=cc)
            t0 = time.perf_counter()
            reps = max(2, 2048 // n)
            for _ in range(reps):
                unet(x, t, encoder_hidden_states=cc)
            out[n] = (time.perf_counter() - t0) / reps / n * 1000
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--repeats", type=int, default=1)
    p.add_argument("--threads", type=int, default=2)
    args = p.parse_args()
    torch.set_num_threads(args.threads)

    import multiprocessing
    from concurrent.futures import ProcessPoolExecutor

    with ProcessPoolExecutor(2, mp_context=multiprocessing.get_context("spawn")) as pool:
        per = list(pool.map(ms_per_image, range(2)))
    ms = {n: statistics.mean(p[n] for p in per) for n in BATCHES}
    print("tiny model, 1 thread, 2 processes side by side: ms per image by batch: "
          + ", ".join(f"{n}: {v:.2f}" for n, v in ms.items())
          + f"; 16 / 128: {ms[16] / ms[128]:.2f}, 256 / 128: {ms[256] / ms[128]:.2f}", flush=True)

    ratios = []
    with tempfile.TemporaryDirectory() as tmp:
        for i in range(args.repeats):
            order = (1, 2) if i % 2 == 0 else (2, 1)
            t = {w: demo_seconds(w, os.path.join(tmp, f"w{w}")) for w in order}
            per_seed = [json.load(open(os.path.join(tmp, f"w{w}", "results.json")))["per_seed"] for w in (1, 2)]
            same = per_seed[0] == per_seed[1]
            ratios.append(t[2] / t[1])
            print(f"repeat {i}: 1 process x {args.threads} threads {t[1]:.0f} s, 2 workers x "
                  f"{max(1, args.threads // 2)} thread {t[2]:.0f} s, ratio {t[2] / t[1]:.2f}, "
                  f"same results: {same}", flush=True)
    print(f"median ratio (2 workers / 1 process): {statistics.median(ratios):.2f}")


if __name__ == "__main__":
    main()
