"""The ``demo`` subcommand of ``python -m training`` (heavy modules are imported when it runs)."""

from __future__ import annotations

import signal
from pathlib import Path


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def cmd_demo(args) -> int:
    from . import pretrain

    if args.eval:
        return _evaluate(args)
    if not args.pretrain:
        return _soft_token_demo(args)
    signal.signal(signal.SIGTERM, _interrupt)  # `kill` checkpoints and stops, like Ctrl-C
    out = args.out or "demo_pretrain"
    res = pretrain.train(out, steps=args.steps, minutes=args.minutes, resume=args.resume,
                         threads=args.threads, **({"batch": args.batch} if args.batch else {}))
    if res["done"]:
        dest = pretrain.export(res["checkpoint"], Path(out) / "tiny_t2i")
        print(f"exported EMA weights to {dest} (ship it by copying to {pretrain.ASSET_DIR})")
    return 0


def _soft_token_demo(args) -> int:
    import torch

    from . import run

    size = run.SMOKE if args.smoke else run.LONG if args.long else run.FULL
    if args.seeds:
        size = run.replace(size, seeds=tuple(range(args.seeds)))
    torch.set_num_threads(args.threads)
    out = run.run_demo(args.out or ("demo_long" if args.long else "demo_report"), size, model=args.model)
    print(f"report: {out / 'report.md'}")
    return 0


def _evaluate(args) -> int:
    import torch

    from . import pretrain

    torch.set_num_threads(args.threads)
    unet, encode = pretrain.load_tiny_t2i(path=args.model)
    for split in args.split.split(","):
        acc = pretrain.evaluate_model(unet, encode, split, n=args.n, seed=args.seed, steps=args.sample_steps,
                                      cfg=args.cfg)
        print(f"{split:8s} n={args.n} " + " ".join(f"{k}={v:.3f}" for k, v in acc.items()))
    return 0


def add_parser(sub) -> None:
    """Register the ``demo`` subcommand on the CLI's subparsers."""
    d = sub.add_parser("demo", help="the embedded demo: train SoftREPA and AGSM tokens on a tiny text-to-image "
                                    "model and report the alignment gain (or pretrain/evaluate that model)")
    d.add_argument("--smoke", action="store_true", help="a shortened run (about a minute) that writes every report file")
    d.add_argument("--long", action="store_true", help="the stability experiment: validation score over many "
                                                       "steps, SoftREPA against AGSM")
    d.add_argument("--seeds", type=int, help="number of seeds (default 3; 1 for --smoke and --long)")
    d.add_argument("--pretrain", action="store_true", help="(re)train the tiny model shipped in training/assets")
    d.add_argument("--out", help="output folder: the report (default demo_report, or demo_long with --long), or "
                                 "with --pretrain the run folder for checkpoints and the export (default demo_pretrain)")
    d.add_argument("--resume", action="store_true", help="with --pretrain: continue the checkpoint in --out")
    d.add_argument("--steps", type=int, help="total optimizer steps (default: the recipe's)")
    d.add_argument("--minutes", type=float, help="stop this call after this much wall time (resume later)")
    d.add_argument("--batch", type=int, help="images per step (default: the recipe's)")
    d.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    d.add_argument("--eval", action="store_true", help="GenEval-mini scores of the tiny model (see --model)")
    d.add_argument("--model", help="model folder for --eval (default: the shipped training/assets/tiny_t2i)")
    d.add_argument("--split", default="train,heldout", help="prompt split(s) for --eval (default train,heldout)")
    d.add_argument("--n", type=int, default=96, help="prompts per split for --eval (default 96)")
    d.add_argument("--seed", type=int, default=0, help="prompt and noise seed for --eval (default 0)")
    d.add_argument("--sample-steps", type=int, default=25, help="DDIM steps for --eval (default 25)")
    d.add_argument("--cfg", type=float, default=3.0, help="guidance scale for --eval (default 3)")
    d.set_defaults(fn=cmd_demo)
