"""The ``demo`` subcommand of ``python -m training`` (heavy modules are imported when it runs)."""

from __future__ import annotations

import signal


def _interrupt(signum, frame):
    raise KeyboardInterrupt


def cmd_demo(args) -> int:
    from . import pretrain

    if args.eval:
        return _evaluate(args)
    if not args.pretrain:
        return _soft_token_demo(args)
    signal.signal(signal.SIGTERM, _interrupt)  # `kill` checkpoints and stops, like Ctrl-C
    res = pretrain.pretrain_phases(args.out or "demo_pretrain", steps=args.steps, finetune_steps=args.finetune_steps,
                                   minutes=args.minutes, resume=args.resume, threads=args.threads, batch=args.batch)
    if res["export"]:
        print(f"exported EMA weights to {res['export']} (ship it by copying to {pretrain.ASSET_DIR})")
    return 0


def _soft_token_demo(args) -> int:
    import torch

    from . import run

    size = run.SMOKE if args.smoke else run.LONG if args.long else run.FULL
    if args.seeds:
        size = run.replace(size, seeds=tuple(range(args.seeds)))
    torch.set_num_threads(args.threads)
    # default: one 1-thread worker per thread, no more than the jobs; run_demo rejects fewer than 1
    workers = args.workers if args.workers is not None else min(args.threads, 1 + len(run.JOBS) * len(size.seeds))
    out = run.run_demo(args.out or ("demo_long" if args.long else "demo_report"), size, model=args.model,
                       workers=workers)
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
    d.add_argument("--steps", type=int, help="with --pretrain: optimizer steps of the first phase (default: the recipe's)")
    d.add_argument("--finetune-steps", type=int, help="with --pretrain: optimizer steps of the second phase "
                                                      "(default: the recipe's)")
    d.add_argument("--minutes", type=float, help="stop this call after this much wall time (resume later)")
    d.add_argument("--batch", type=int, help="images per step (default: the recipe's)")
    d.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    d.add_argument("--workers", type=int, help="soft-token demo: processes sharing the --threads (default: one "
                   "1-thread process per thread, the fastest for the tiny model)")
    d.add_argument("--eval", action="store_true", help="GenEval-mini scores of the tiny model (see --model)")
    d.add_argument("--model", help="model folder for --eval (default: the shipped training/assets/tiny_t2i)")
    d.add_argument("--split", default="train,heldout", help="prompt split(s) for --eval (default train,heldout)")
    d.add_argument("--n", type=int, default=96, help="prompts per split for --eval (default 96)")
    d.add_argument("--seed", type=int, default=0, help="prompt and noise seed for --eval (default 0)")
    d.add_argument("--sample-steps", type=int, default=25, help="DDIM steps for --eval (default 25)")
    d.add_argument("--cfg", type=float, default=3.0, help="guidance scale for --eval (default 3)")
    d.set_defaults(fn=cmd_demo)


def cmd_refine_sweep(args) -> int:
    """Validation sweep of the refinement step: GenEval-mini per candidate step and without refinement."""
    from .refinement import parse_steps, settings_with  # light: no diffusers

    steps = parse_steps(args.steps, args.sample_steps)  # bad input fails before any model is loaded
    settings = settings_with(iterations=args.iterations, loss=args.loss, scale=args.step_size)
    if args.seeds < 1 or args.n < 1:
        raise ValueError(f"--seeds and --n must be >= 1, got {args.seeds}, {args.n}")

    import torch

    from .refinement import run_sweep

    torch.set_num_threads(args.threads)
    res = run_sweep(args.out, steps, seeds=args.seeds, n=args.n, settings=settings, sample_steps=args.sample_steps,
                    cfg=args.cfg, model=args.model, progress=not args.no_progress)
    st = res["mean_std"]
    print(f"baseline overall {st['baseline']['overall'][0]:.3f} ± {st['baseline']['overall'][1]:.3f}; best step "
          f"{res['best_step']} overall {st[str(res['best_step'])]['overall'][0]:.3f} ± "
          f"{st[str(res['best_step'])]['overall'][1]:.3f}")
    print(f"wrote {args.out}/sweep.md, sweep.json, sweep.png")
    return 0


def add_refine_sweep_parser(sub) -> None:
    """Register the ``refine-sweep`` subcommand (step selection on the demo's validation prompts)."""
    r = sub.add_parser("refine-sweep", help="choose the step-selected refinement step: GenEval-mini of the tiny demo "
                                            "model with refinement at each candidate step vs none, on validation prompts")
    r.add_argument("--steps", help="candidate step indices of the DDIM schedule, e.g. '0,2,4' or '0-11' "
                                   "(default: every step)")
    r.add_argument("--seeds", type=int, default=3, help="seeds (prompt draws and noise; default 3)")
    r.add_argument("--n", type=int, default=128, help="validation prompts per seed (default 128)")
    r.add_argument("--iterations", type=int, help="IterRef iterations at the step (default: the demo's, 10)")
    r.add_argument("--step-size", type=float, help="scale of the step size alpha_i = scale * sqrt(linspace(1, 0.5, "
                                                   "steps)[i]) (default: the demo's, 200; Attend-and-Excite's is 20)")
    r.add_argument("--loss", choices=["cn", "iou", "cn+iou"], help="attention-map loss (default: the demo's, cn+iou)")
    r.add_argument("--sample-steps", type=int, default=12, help="DDIM steps (default 12, the demo's)")
    r.add_argument("--cfg", type=float, default=3.0, help="guidance scale (default 3, the demo's)")
    r.add_argument("--threads", type=int, default=2, help="torch CPU threads (default 2)")
    r.add_argument("--model", help="tiny_t2i folder (default: the shipped training/assets/tiny_t2i)")
    r.add_argument("--out", default="refine_sweep", help="output folder for sweep.md, sweep.json, sweep.png "
                                                         "(default refine_sweep)")
    r.add_argument("--no-progress", action="store_true", help="no progress bar")
    r.set_defaults(fn=cmd_refine_sweep)
