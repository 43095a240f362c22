"""Sampling overhead of soft tokens in real ComfyUI: time with tokens / time without.

Runs ComfyUI's own sampler (what KSampler does) side by side, interleaved, on
- a UNet (SD1.5 layout: 77-token context, tokens after BOS in the down blocks), and
- an MMDiT (SD3 layout: 77 + 256 text tokens, tokens in joint blocks 0-4),
with random weights, and prints the median ratio. Target: overhead <= 3%. Control rows
(patches that do no extra work) show the noise floor of the machine the ratios come from.

    COMFYUI_PATH=/path/to/ComfyUI python bench/sampling_overhead.py [--repeats 7]
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "tests"))
sys.path.insert(0, os.path.join(ROOT, "tests", "integration"))

import comfy_env  # noqa: E402


def wall(fn):
    t0 = time.perf_counter()
    fn()
    return time.perf_counter() - t0


def compare(name, model, patched, pos, neg, steps, repeats, latent_hw):
    """Median over interleaved pairs of (time with tokens / time without); the order alternates."""
    run = lambda m: comfy_env.sample(m, pos, neg, steps=steps, cfg=5.0, latent_hw=latent_hw)  # noqa: E731
    run(model), run(patched)  # warm-up
    base, tok, ratios = [], [], []
    for i in range(repeats):
        if i % 2:
            t, b = wall(lambda: run(patched)), wall(lambda: run(model))
        else:
            b, t = wall(lambda: run(model)), wall(lambda: run(patched))
        base.append(b), tok.append(t), ratios.append(t / b)
    ratio = statistics.median(ratios)
    print(f"{name:<36} without {statistics.median(base) * 1000:8.1f} ms   with {statistics.median(tok) * 1000:8.1f} ms"
          f"   ratio {ratio:.4f}   overhead {100 * (ratio - 1):+.2f}%   {'OK' if ratio <= 1.03 else 'ABOVE TARGET'}")
    return ratio


def main():
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=9)
    ap.add_argument("--steps", type=int, default=4)
    args = ap.parse_args()
    if not comfy_env.import_comfy():
        sys.exit("ComfyUI not found: set COMFYUI_PATH")
    from pack_import import submodule

    patch, layouts, tokens_mod = submodule("nodes.patch"), submodule("training.layouts"), submodule("training.tokens")
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads, median of {args.repeats} interleaved pairs, "
          f"{args.steps} steps, CFG batch of 2\n")

    unet = comfy_env.tiny_sd15(seed=0, unet_overrides=dict(model_channels=64, channel_mult=[1, 2, 2],
                                                           num_res_blocks=[2, 2, 2],
                                                           transformer_depth=[1] * 6,
                                                           transformer_depth_output=[1] * 9))
    lay = layouts.TokenLayout(arch="sd15", method="softrepa", n_tokens=4, width=768, text_width=768,
                              blocks=layouts.default_blocks("sd15", "softrepa"))
    tok = tokens_mod.SoftTokens(lay)
    pos, neg = torch.randn(1, 77, 768), torch.randn(1, 77, 768)
    ratios = [compare("UNet (SD1.5 layout), 32x32 latent", unet, patch.apply_soft_tokens(unet, tok),
                      pos, neg, args.steps, args.repeats, (32, 32))]
    ratios.append(compare("UNet, strength 0.5 (bias path)", unet, patch.apply_soft_tokens(unet, tok, 0.5),
                          pos, neg, args.steps, args.repeats, (32, 32)))
    control = unet.clone()  # does no extra work: shows the measurement's noise floor
    control.set_model_attn2_patch(lambda n, c, v, extra: (n, c, v))
    compare("control: no-op attn2 patch", unet, control, pos, neg, args.steps, args.repeats, (32, 32))

    depth = 6  # hidden 384
    mmdit = comfy_env.tiny_sd3(seed=0, depth=depth, num_blocks=8, pos_embed_max_size=32)
    lay = layouts.TokenLayout(arch="sd3", method="softrepa", n_tokens=4, width=64 * depth,
                              text_width=64 * depth, blocks=tuple(range(5)))
    tok = tokens_mod.SoftTokens(lay)
    pos, neg = torch.randn(1, 77 + 256, 4096), torch.randn(1, 77 + 256, 4096)
    ratios.append(compare("MMDiT (SD3 layout), 333 text tokens", mmdit, patch.apply_soft_tokens(mmdit, tok),
                          pos, neg, args.steps, args.repeats, (32, 32)))
    control = mmdit.clone()
    for i in range(5):
        control.set_model_patch_replace(lambda a, extra: extra["original_block"](a), "dit", "double_block", i)
    compare("control: identity double_block replace", mmdit, control, pos, neg, args.steps, args.repeats, (32, 32))
    worst = max(ratios)
    print(f"\nworst ratio {worst:.4f} (target <= 1.03): {'PASS' if worst <= 1.03 else 'FAIL'}")


if __name__ == "__main__":
    main()
