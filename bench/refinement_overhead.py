"""Sampling time with step-selected refinement at one step over plain sampling, side by side.

IterRef at one denoising step costs ``iterations`` extra forward + backward passes of the
conditional half of the batch (no CFG), once per image; the rest of sampling is unchanged.
Two models, each timed in one process with plain and refined runs interleaved pair by pair
(the order alternates), so machine load affects both alike; the median ratio is printed:
- the tiny demo model (``training/assets/tiny_t2i``): 12 DDIM steps with CFG, as the demo samples,
  refinement on its 8x8 cross-attention maps (``training/demo/refinement.py``);
- a tiny SD1.5-class diffusers UNet (random weights, 77 x 768 context, ``tests/tiny_models.py``)
  at a 16x16 latent, the same DDIM + CFG loop, maps on its 8x8 cross-attention layers
  (latent / 2: this UNet has only two resolutions).

The ratio, not the absolute time, is the result: on a busy machine both sides slow down together.

    python bench/refinement_overhead.py [--iterations 0 5 10 20] [--repeats 3] [--threads 1]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)
sys.path.insert(0, os.path.join(ROOT, "tests"))


def timed(fn) -> float:
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def compare(name: str, plain, refined, iterations: list, repeats: int) -> dict:
    """{iterations: median ratio} of refined / plain over interleaved pairs; prints one row each."""
    plain()  # warm-up
    out = {}
    for k in iterations:
        refined(k)
        base, ref, ratios = [], [], []
        for i in range(repeats):
            if i % 2:
                r, b = timed(lambda: refined(k)), timed(plain)
            else:
                b, r = timed(plain), timed(lambda: refined(k))
            base.append(b), ref.append(r), ratios.append(r / b)
        out[k] = statistics.median(ratios)
        print(f"{name:<34} {k:>3} iterations   plain {statistics.median(base):7.2f} s   refined "
              f"{statistics.median(ref):7.2f} s   ratio {out[k]:.3f} ({100 * (out[k] - 1):+.1f}%)", flush=True)
    return out


def demo_model(args):
    from training.demo import pretrain, refinement, world

    unet, encode = pretrain.load_tiny_t2i()
    prompts = [s.caption for s in world.sample_specs(1234, args.prompts, "train")]
    kw = dict(seed=0, steps=12, cfg=3.0)
    plain = lambda: pretrain.sample(unet, encode, prompts, **kw)  # noqa: E731

    def refined(k):
        settings = refinement.settings_with(iterations=k)
        r = refinement.Refiner(unet, encode.tokenizer, step=refinement.DEFAULT_STEP, settings=settings)
        pretrain.sample(unet, encode, prompts, refine=r, **kw)

    return compare(f"tiny demo model, {len(prompts)} prompts", plain, refined, args.iterations, args.repeats)


def sd15_class(args, latent: int = 16, grid=(8, 8)):
    from tiny_models import tiny_unet

    from training.attention_maps import Stream, batch_loss, step_size
    from training.backend import scaled_linear_alphas_cumprod
    from training.refine import AttentionCapture, refine_latent

    unet = tiny_unet().requires_grad_(False)
    n, steps, cfg, at = args.prompts // 4, 12, 5.0, 2
    g = torch.Generator().manual_seed(0)
    cond, uncond = torch.randn(n, 77, 768, generator=g), torch.randn(1, 77, 768, generator=g)
    x_init = torch.randn(n, 4, latent, latent, generator=g)
    abar = scaled_linear_alphas_cumprod(0.00085, 0.012).float()
    ts = [int(round(1000 - i * 1000 / steps)) - 1 for i in range(steps)]
    streams = [[Stream(columns=(0, 77), window=(1, 76), subjects=((3,), (7,)))]] * n

    @torch.no_grad()
    def sample(k=None):
        x = x_init.clone()
        c = torch.cat([uncond.expand(n, -1, -1), cond])
        for i, t in enumerate(ts):
            if k and i == at:
                tt = torch.full((n,), t)

                def loss_fn(xg):
                    with AttentionCapture(unet, grid=grid) as cap:
                        unet(xg, tt, encoder_hidden_states=cond)
                    return batch_loss(cap.maps(), streams)

                x, _ = refine_latent(x, loss_fn, step_size(at, steps), k)
            e_u, e_c = unet(torch.cat([x, x]), torch.full((2 * n,), t), encoder_hidden_states=c).sample.chunk(2)
            eps = e_u + cfg * (e_c - e_u)
            a_t, a_p = abar[t], (abar[ts[i + 1]] if i + 1 < steps else torch.tensor(1.0))
            x0 = (x - (1 - a_t).sqrt() * eps) / a_t.sqrt()
            x = a_p.sqrt() * x0 + (1 - a_p).sqrt() * eps
        return x

    return compare(f"SD1.5-class UNet {latent}x{latent}, {n} prompts", lambda: sample(), sample, args.iterations,
                   args.repeats)


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--iterations", type=int, nargs="+", default=[0, 5, 10, 20], help="IterRef iterations")
    ap.add_argument("--repeats", type=int, default=3, help="interleaved pairs per iteration count (median kept)")
    ap.add_argument("--prompts", type=int, default=64, help="prompts for the demo model (a quarter for the UNet)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (default 1: the machine is shared)")
    ap.add_argument("--skip-sd15", action="store_true", help="only the demo model")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} thread(s), median of {args.repeats} interleaved "
          f"pairs, 12 DDIM steps with CFG, refinement at one step\n")
    demo_model(args)
    if not args.skip_sd15:
        sd15_class(args)


if __name__ == "__main__":
    main()
