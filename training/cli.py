"""Command line: ``python -m training {convert,info,demo,refine-sweep,train,score} ...``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from .demo.cli import add_parser as demo_parser
from .demo.cli import add_refine_sweep_parser
from .formats import load_tokens, save_tokens, train_config_of
from .layouts import ARCH_FAMILY, TIME_TABLE_CHOICES, TokenLayout, default_blocks, parse_blocks, uses_time_table


def cmd_convert(args) -> int:
    src = Path(args.src)
    blocks = parse_blocks(args.blocks) if args.blocks else None
    tokens = load_tokens(src, arch=args.arch, blocks=blocks)
    out = Path(args.out) if args.out else _default_out(src)
    save_tokens(tokens, out, overwrite=args.force)
    print(f"wrote {out}: {tokens.layout.describe()}")
    return 0


def cmd_info(args) -> int:
    tokens = load_tokens(args.path)
    lay = tokens.layout
    print(f"file:        {args.path}")
    print(f"method:      {lay.method}")
    print(f"arch:        {lay.arch} ({lay.family})")
    print(f"tokens:      {lay.n_tokens} per set, sets {', '.join(lay.sets)}")
    print(f"width:       {lay.width}" + (f" (projected to {lay.text_width} by context_embedder)" if lay.projected else ""))
    where = ", ".join(map(str, lay.blocks))
    print(f"layers:      {lay.n_layers} token layer(s) on {where}")
    print(f"position:    {lay.position}")
    print(f"time table:  {'(%d, %d)' % lay.time_shape if lay.time_shape else 'none'}")
    print(f"parameters:  {tokens.n_params():,}")
    print(f"static:      mean {tokens.static.mean():.5f}, std {tokens.static.std():.5f}")
    for k, v in sorted(tokens.meta.items()):
        if k != "train_config":
            print(f"{k + ':':<13}{v}")
    cfg = train_config_of(tokens)
    if cfg:
        print("train config:", ", ".join(f"{k}={v}" for k, v in sorted(cfg.items())))
    return 0


def _default_out(src: Path) -> Path:
    name = src.name if src.is_dir() else src.parent.name
    return Path(f"{name or 'tokens'}.safetensors")


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m training", description=__doc__)
    sub = p.add_subparsers(dest="cmd", required=True)
    c = sub.add_parser("convert", help="convert an official token folder or .pth into a .safetensors token file")
    c.add_argument("src", help="official folder (dc_tokens.pth [+ dc_t_tokens.pth] or soft_tokens.pth + soft_t_tokens.pth) or the static .pth")
    c.add_argument("--out", help="output .safetensors (default: <folder name>.safetensors)")
    c.add_argument("--arch", choices=sorted(ARCH_FAMILY), help="override the architecture inferred from the shapes")
    c.add_argument("--blocks", help="override the block groups: 'down', 'down,mid' (UNet) or '0-4' (SD3). "
                                    "Default: what the release was trained with")
    c.add_argument("--force", action="store_true", help="overwrite an existing output file")
    c.set_defaults(fn=cmd_convert)
    i = sub.add_parser("info", help="print what a token file (or official folder) holds")
    i.add_argument("path")
    i.set_defaults(fn=cmd_info)
    demo_parser(sub)
    add_refine_sweep_parser(sub)
    add_train_parsers(sub)
    return p


# --- train / score --------------------------------------------------------------------------
# Heavy modules (diffusers, transformers, the trainer) are imported inside the commands, after
# the arguments have been checked, so bad input fails fast.

DTYPES = ("fp32", "fp16", "bf16")


def add_train_parsers(sub) -> None:
    """Register the ``train`` and ``score`` subcommands."""
    t = sub.add_parser("train", help="train soft tokens (SoftREPA or AGSM) on a local diffusers model (SD1.5, SD2.x, "
                                     "SDXL, SD3/3.5, Flux.1 pipeline folders; single-file SD1.5/SDXL/SD3)")
    t.add_argument("--backend", choices=["auto", "comfy", "diffusers"], default="auto",
                   help="auto (default): with --ckpt, ComfyUI's loader and the Train node's code when ComfyUI is "
                        "found (COMFYUI_PATH, or this pack in ComfyUI/custom_nodes) and neither --config nor "
                        "--dtype fp16 is given; else diffusers")
    _add_source_args(t, "local diffusers pipeline folder (denoiser, text encoders, VAE)")
    t.add_argument("--data", required=True, help="folder of images + .txt captions, a .jsonl manifest or a COCO captions .json")
    t.add_argument("--method", required=True, choices=["softrepa", "agsm"])
    t.add_argument("--out", required=True, help="output token file (.safetensors); checkpoint, best tokens and "
                                                "history are written beside it")
    t.add_argument("--steps", type=int, help="total optimizer steps (default 1000)")
    t.add_argument("--batch", type=int, help="images per step B; B*B pairs (default 4)")
    t.add_argument("--tokens", type=int, default=4, help="soft tokens per set and layer m (default 4)")
    t.add_argument("--blocks", help="UNet block groups ('down', 'down,mid') or SD3 joint / Flux double blocks "
                                    "('0-4'); default: the official choice")
    t.add_argument("--layers", type=int, default=5, help="SD3/Flux: token layers on the first L joint (double) "
                                                         "blocks (default 5)")
    t.add_argument("--time", choices=TIME_TABLE_CHOICES, default="official",
                   help="time-dependent token table (official: off for SoftREPA SDXL, on otherwise)")
    t.add_argument("--lr", type=float, help="AdamW learning rate (default 1e-3)")
    t.add_argument("--chunk", type=int, help="pairs per denoiser call (memory only; default all B*B)")
    t.add_argument("--seed", type=int, help="seed of tokens, t, noise and data order (default 42)")
    t.add_argument("--val-every", type=int, help="validation and LR-schedule interval in steps (default 500)")
    t.add_argument("--lr-every", type=int, help="steps per LR-scheduler step (default: --val-every, official)")
    t.add_argument("--ckpt-every", type=int, help="checkpoint interval in steps (default 500; 0 = only at the end)")
    t.add_argument("--t-min", type=int, help="smallest training timestep (default 0)")
    t.add_argument("--t-max", type=int, help="training timesteps are < t-max (default 1000)")
    t.add_argument("--dweight", type=float, help="SoftREPA diffusion-loss weight (default 0)")
    t.add_argument("--tau", type=float, help="SoftREPA temperature (default 0.07)")
    t.add_argument("--gamma-pos", type=float, help="AGSM gamma+ (default 1)")
    t.add_argument("--gamma-neg", type=float, help="AGSM gamma- (default 1 for UNets, 0.1 for SD3 and Flux)")
    t.add_argument("--ema-decay", type=float, help="AGSM EMA decay (default 0.9999)")
    t.add_argument("--max-bad-steps", type=int, help="stop after this many non-finite steps in a row (default 5)")
    t.add_argument("--val-data", help="held-out dataset (default: --val-fraction of --data)")
    t.add_argument("--val-fraction", type=float, default=0.0, help="share of --data held out for validation")
    t.add_argument("--val-limit", type=int, default=50, help="held-out pairs scored per validation (default 50)")
    t.add_argument("--resume", help="continue the run of this checkpoint (<out>.ckpt.pt)")
    t.add_argument("--overwrite", action="store_true", help="replace existing run files of a fresh run")
    _add_model_args(t)
    t.add_argument("--grad-checkpointing", action="store_true", help="recompute backbone activations in backward")
    t.add_argument("--no-progress", action="store_true", help="no progress bar")
    t.add_argument("--dist-timeout", type=float, default=600.0,
                   help="under torchrun: seconds a rank waits for the others in a collective before the job fails "
                        "(default 600)")
    t.set_defaults(fn=cmd_train)

    s = sub.add_parser("score", help="alignment score (diffusion-classifier accuracy) with and without tokens")
    _add_source_args(s, "local diffusers pipeline folder")
    s.add_argument("--data", required=True, help="held-out dataset (first caption of each image is used)")
    s.add_argument("--tokens", help="token file; without it only the plain model is scored")
    s.add_argument("--limit", type=int, default=50, help="image-caption pairs to score (default 50)")
    s.add_argument("--group", type=int, default=4, help="candidate captions per image (default 4; chance = 1/group)")
    s.add_argument("--ts", default="100,300,500,700,900", help="timesteps averaged over (default 100,300,500,700,900)")
    s.add_argument("--seed", type=int, default=0, help="seed of the fixed noise (default 0)")
    s.add_argument("--chunk", type=int, help="pairs per denoiser call (memory only)")
    s.add_argument("--json", action="store_true", help="print the result as JSON")
    _add_model_args(s)
    s.set_defaults(fn=cmd_score)


def _add_source_args(p, model_help: str) -> None:
    g = p.add_mutually_exclusive_group(required=True)
    g.add_argument("--model", help=model_help)
    g.add_argument("--ckpt", help="single-file checkpoint (.safetensors with original key names, as in ComfyUI's "
                                  "models/checkpoints): SD1.5, SDXL or SD3")
    p.add_argument("--config", help="with --ckpt: local diffusers pipeline folder of that model, for its configs and "
                                    "tokenizers (default: the shipped configs, which hold no tokenizer vocabularies)")


def _add_model_args(p) -> None:
    p.add_argument("--dtype", choices=DTYPES, default="fp32", help="weights and autocast dtype (default fp32)")
    p.add_argument("--device", help="torch device (default cuda if available, else cpu)")
    p.add_argument("--size", type=int, default=512, help="training / scoring image size (default 512)")
    p.add_argument("--cache", help="folder for cached latents and text conditioning (default: in memory)")
    p.add_argument("--guidance", type=float, help="Flux.1 dev: the distilled guidance value the model is conditioned "
                                                  "on (default 3.5, FluxPipeline's and ComfyUI's); schnell and the "
                                                  "other families have none")


def _existing(path, what: str) -> Path:
    p = Path(path)
    if not p.exists():
        raise ValueError(f"{what} {p} does not exist")
    return p


def _train_config(args, state=None):
    """TrainConfig from the arguments; with a loaded --resume checkpoint ``state``, its config with
    --steps/--ckpt-every."""
    from .trainer import RESUME_MUTABLE, TrainConfig

    given = {"steps": args.steps, "batch": args.batch, "lr": args.lr, "chunk": args.chunk, "seed": args.seed,
             "val_every": args.val_every, "lr_every": args.lr_every, "ckpt_every": args.ckpt_every,
             "t_min": args.t_min, "t_max": args.t_max, "dweight": args.dweight, "tau": args.tau,
             "gamma_pos": args.gamma_pos, "gamma_neg": args.gamma_neg, "ema_decay": args.ema_decay,
             "max_bad_steps": args.max_bad_steps}
    given = {k: v for k, v in given.items() if v is not None}
    if state is not None:
        fixed = sorted(k for k in given if k not in RESUME_MUTABLE and given[k] != state["config"][k])
        if fixed:
            raise ValueError(f"--resume continues the checkpoint's configuration; only {', '.join(RESUME_MUTABLE)} "
                             f"may change (got {', '.join(fixed)})")
        if state["config"]["method"] != args.method:
            raise ValueError(f"the checkpoint trains {state['config']['method']}, not {args.method}")
        return TrainConfig.from_dict({**state["config"], **{k: given[k] for k in RESUME_MUTABLE if k in given}})
    return TrainConfig(method=args.method, **given)


def _pipeline_arch(model: Path) -> str:
    """sd15 / sdxl / sd3 of a local pipeline folder, read from its model_index.json (no weights loaded)."""
    import json

    from .encoders import detect_arch

    index = model / "model_index.json"
    if not index.is_file():
        raise ValueError(f"{model} is not a diffusers pipeline folder (no model_index.json); training and scoring "
                         "need the whole pipeline (denoiser, text encoders, VAE)")
    return detect_arch(json.loads(index.read_text(encoding="utf-8")), model)


def _source(args) -> Path:
    """The --model folder or the --ckpt file, checked to exist (and --config, which needs --ckpt)."""
    if args.ckpt:
        if args.config:
            _existing(args.config, "config folder")
        return _existing(args.ckpt, "checkpoint")
    if args.config:
        raise ValueError("--config only applies to --ckpt (a single-file checkpoint)")
    return _existing(args.model, "model folder")


def _source_arch(args, source: Path) -> str:
    """sd15 / sdxl / sd3 / flux ... of the --model pipeline (model_index.json) or the --ckpt file (its header);
    no weights. Also refuses --guidance for a model that is not Flux."""
    if args.ckpt:
        from .single_file import detect_checkpoint_arch

        arch = detect_checkpoint_arch(source)
    else:
        arch = _pipeline_arch(source)
    _check_guidance(args, arch)
    return arch


def _check_guidance(args, arch: str) -> None:
    if getattr(args, "guidance", None) is not None and arch != "flux":
        raise ValueError(f"--guidance only applies to Flux.1 dev, not {arch}")


def _load(args, device=None):
    """(backend, encoders) of --model or --ckpt, on ``device`` (default: --device, else cuda if available)."""
    if args.ckpt:
        backend, encoders, _ = _load_ckpt(args, device)
        return backend, encoders
    return _load_model(args, Path(args.model), device)


def _dtype(args):
    import torch

    return {"fp32": torch.float32, "fp16": torch.float16, "bf16": torch.bfloat16}[args.dtype]


def _device(args):
    """--device, else cuda if available, else cpu (one process; see distributed.device)."""
    from .distributed import SINGLE, device

    return device(SINGLE, args.device)


def _load_model(args, model: Path, device=None):
    """(backend, encoders) for a local pipeline folder."""
    from .diffusers_backend import DiffusersBackend, load_denoiser, prediction_from_folder, schedule_from_folder
    from .diffusers_hooks import model_family
    from .encoders import Encoders

    dtype = _dtype(args)
    device = device or _device(args)
    denoiser = load_denoiser(model, dtype=dtype).to(device)
    kwargs = {}
    if model_family(denoiser) == "unet" and schedule_from_folder(model) is not None:
        kwargs["alphas_cumprod"] = schedule_from_folder(model)  # the pipeline's own noise schedule
    if model_family(denoiser) == "unet":
        kwargs["prediction"] = prediction_from_folder(model)  # epsilon, or v (SD2.x 768-v, v-pred SDXL)
    if getattr(args, "guidance", None) is not None:  # Flux dev only (the backend refuses schnell)
        kwargs["guidance"] = args.guidance
    backend = DiffusersBackend(denoiser, autocast_dtype=None if args.dtype == "fp32" else args.dtype,
                               gradient_checkpointing=getattr(args, "grad_checkpointing", False), **kwargs)
    encoders = Encoders.from_pipeline(model, device=device, dtype=dtype, image_size=args.size)
    return backend, encoders


def _load_ckpt(args, device=None):
    """(backend, encoders, arch) for a single-file checkpoint (--ckpt, optional --config).

    Without ComfyUI: diffusers' single-file conversion with local configs (training/single_file.py).
    """
    from .single_file import load_single_file

    return load_single_file(args.ckpt, config=args.config, device=device or _device(args), dtype=_dtype(args),
                            image_size=args.size, gradient_checkpointing=getattr(args, "grad_checkpointing", False),
                            autocast_dtype=None if args.dtype == "fp32" else args.dtype)


def cmd_train(args) -> int:
    from . import distributed

    if not distributed.launched():
        if _use_comfy(args):
            return _train_with_comfy(args)
        return _train(args, distributed.SINGLE)
    if args.backend == "comfy":
        raise ValueError("training under torchrun runs on the diffusers backend; pass --backend diffusers or auto")
    import signal

    dist = distributed.init(args.dist_timeout)
    _stop_on_sigterm(dist)
    try:
        code = _train(args, dist)
    finally:  # the run is saved (or failed): the launcher's SIGTERM must not interrupt the exit
        signal.signal(signal.SIGTERM, signal.SIG_IGN)
    distributed.shutdown()
    return code


def _stop_on_sigterm(dist) -> None:
    """torchrun stops the other ranks with SIGTERM when one fails: end like Ctrl-C (rank 0 saves the
    run as of its last completed step) instead of dying mid-write."""
    import signal

    def stop(signum, frame):
        if dist.is_main:
            print("rank 0: SIGTERM from the launcher (another rank failed, or the job was stopped); saving the run "
                  "as of its last completed step", file=sys.stderr)
        raise KeyboardInterrupt

    signal.signal(signal.SIGTERM, stop)


def _train(args, dist) -> int:
    """The diffusers-backend training run, on one process or as one rank of a torchrun job."""
    from . import distributed
    from .checkpoint import RunFiles, load_checkpoint

    # Checks before any heavy work; under torchrun every rank stops on any rank's error (``agree``).
    error = state = None
    try:
        files = RunFiles.of(args.out)
        source = _source(args)
        data = _existing(args.data, "dataset")
        if args.val_data:
            _existing(args.val_data, "validation dataset")
        if dist.is_main:  # only rank 0 reads the checkpoint and writes files
            if args.resume:
                state = load_checkpoint(_existing(args.resume, "checkpoint"))
            else:
                files.check_new(args.overwrite)
        arch = _source_arch(args, source)
        device = distributed.device(dist, args.device)
        cfg = _train_config(args, state)
        cfg.check()
        if dist.enabled and cfg.batch < dist.world_size:
            raise ValueError(f"--batch {cfg.batch} gives fewer image rows than the {dist.world_size} processes; "
                             "use at most as many processes as images per step")
    except Exception as e:
        error = e
    dist.agree(error)
    if args.resume and dist.enabled:
        state = dist.broadcast(state, "sending the checkpoint from rank 0")
        cfg = _train_config(args, state)
    if state is None:  # check the token layout choices now (widths are known once the model is loaded)
        blocks = parse_blocks(args.blocks) if args.blocks else default_blocks(arch, args.method, args.layers)
        TokenLayout(arch=arch, method=args.method, n_tokens=args.tokens, width=8, text_width=8, blocks=tuple(blocks))
    say = print if dist.is_main else (lambda *a, **k: None)

    # Heavy work from here on.
    from .cache import EncodeCache
    from .datasets import open_dataset, split_dataset
    from .diffusers_hooks import describe_model
    from .trainer import DatasetData, Trainer, bos_init

    ds = open_dataset(data, size=args.size)
    train_ds, val_ds = split_dataset(ds, args.val_fraction, seed=cfg.seed, val_path=args.val_data)
    say(f"data: {train_ds.summary()}")
    group = cfg.score_group or cfg.batch
    if val_ds is not None and min(val_ds.n_images, args.val_limit) < group:
        raise ValueError(f"validation needs at least {group} held-out images (one group of candidates for the "
                         f"alignment score); got {min(val_ds.n_images, args.val_limit)}. Raise --val-fraction "
                         "or --val-limit, or pass --val-data")

    backend, encoders = _load(args, device)
    info = describe_model(backend.denoiser)
    if state is not None:
        layout = TokenLayout.from_json(state["layout"])
    else:
        time_on = uses_time_table(arch, args.method, args.time)
        layout = TokenLayout(arch=arch, method=args.method, n_tokens=args.tokens, width=info["text_width"],
                             text_width=info["text_width"], blocks=tuple(blocks), time_buckets=100 if time_on else 0)
    # before any file is written (e.g. --layers beyond the model's joint/double blocks)
    layout.check_model(info["family"], info["text_width"], info.get("n_blocks"), info.get("embed_width"),
                       name="token layout", model_arch=info.get("arch"))
    # Every rank encodes (or reads a shared --cache: its writes are atomic, so ranks never clash).
    cache = EncodeCache(encoders, root=args.cache)
    cache.prepare(train_ds)
    val = None
    if val_ds is not None:
        cache.prepare(val_ds)
        val = cache.first_caption_pairs(val_ds, args.val_limit)
        say(f"validation: {val[0].shape[0]} held-out pairs")
    init = bos_init(encoders.encode_text([""])["context"]) if arch == "sd15" else None
    meta = {("ckpt" if args.ckpt else "model"): str(source), "data": str(data), "arch": arch, "dtype": args.dtype,
            "size": args.size, "data_report": train_ds.report()}
    if getattr(backend, "flux", False) and backend.denoiser.config.guidance_embeds:
        meta["guidance"] = backend.guidance
    if dist.enabled:
        import torch

        say(f"torchrun: {dist.world_size} processes ({torch.distributed.get_backend()}), each evaluating "
            f"{len(dist.rows(cfg.batch))} of the {cfg.batch} image rows of every step against all {cfg.batch} captions")
    trainer = Trainer(backend, layout, DatasetData(train_ds, cache, cfg.batch, cfg.seed, backend.device), cfg,
                      files.out, val=val, init_static=init, resume=state, overwrite=args.overwrite,
                      meta=meta, progress=not args.no_progress, dist=dist)
    res = trainer.run()
    return _report(res, files, cfg) if dist.is_main else _exit_code(res)


def _exit_code(res) -> int:
    """0 done, 3 NaN stop, 130 cancelled."""
    return {"nan": 3, "cancelled": 130}.get(res.stopped, 0)


def _report(res, files, cfg) -> int:
    """Print how a run ended; the exit code (0 done, 3 NaN stop, 130 cancelled)."""
    print(f"{res.stopped} at step {res.step}/{cfg.steps}: wrote {files.out}"
          + (f"; best validation accuracy {res.best['accuracy']:.4f} at step {res.best['step']} in {files.best}"
             if res.best else ""))
    if res.stopped == "nan":
        print(f"error: stopped after {cfg.max_bad_steps} non-finite steps in a row; the last good tokens were saved",
              file=sys.stderr)
        return 3
    if res.stopped == "cancelled":
        print(f"interrupted; continue with --resume {files.ckpt}", file=sys.stderr)
        return 130
    return 0


# --- the ComfyUI route for --ckpt ------------------------------------------------------------

def _comfyui_root() -> Path | None:
    """ComfyUI's root: $COMFYUI_PATH, or three levels up when this pack sits in ComfyUI/custom_nodes/."""
    import os

    env = os.environ.get("COMFYUI_PATH")
    candidates = [Path(env).expanduser()] if env else [Path(__file__).resolve().parents[3]]
    for root in candidates:
        if (root / "main.py").is_file() and (root / "comfy").is_dir():
            return root
    return None


def _use_comfy(args) -> bool:
    """--backend comfy, or auto with --ckpt and ComfyUI found (and no diffusers-only --config / fp16)."""
    if args.backend == "comfy":
        if not args.ckpt:
            raise ValueError("--backend comfy trains on a single-file checkpoint: pass --ckpt")
        if _comfyui_root() is None:
            raise ValueError("--backend comfy needs ComfyUI: set COMFYUI_PATH to a ComfyUI checkout")
        return True
    return (args.backend == "auto" and bool(args.ckpt) and not args.config and args.dtype != "fp16"
            and _comfyui_root() is not None)


def _comfy_pack():
    """This repository imported as a ComfyUI node package (ComfyUI on sys.path, its device chosen first)."""
    import importlib
    import importlib.util
    import sys

    root = _comfyui_root()
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    import comfy.options  # noqa: F401  (ComfyUI parses no command line when imported)
    import comfy.cli_args

    if not _cuda_available():
        comfy.cli_args.args.cpu = True  # before comfy.model_management picks its device
    name = "comfyui_soft_tokens_pack"
    if name not in sys.modules:
        repo = Path(__file__).resolve().parents[1]
        spec = importlib.util.spec_from_file_location(name, repo / "__init__.py", submodule_search_locations=[str(repo)])
        sys.modules[name] = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(sys.modules[name])
    return importlib.import_module(f"{name}.nodes.cli_train"), importlib.import_module(f"{name}.nodes.train_run")


def _cuda_available() -> bool:
    import torch

    return torch.cuda.is_available()


def _train_with_comfy(args) -> int:
    """--ckpt through ComfyUI's loader and the Train Soft Tokens node's run function."""
    source = _source(args)
    data = _existing(args.data, "dataset")
    if args.ckpt:  # header checks (file type, supported family) before loading anything
        from .single_file import detect_checkpoint_arch

        _check_guidance(args, detect_checkpoint_arch(source, comfy=True))  # also SD2.x, SD3.5, v-pred SDXL
    else:
        _source_arch(args, source)
    if args.val_data or args.config or args.dtype == "fp16":
        raise ValueError("with ComfyUI (--backend comfy/auto and --ckpt), --val-data, --config and --dtype fp16 are "
                         "not available; use --val-fraction, and --dtype fp32 or bf16 (or --backend diffusers)")
    if args.resume:
        _existing(args.resume, "checkpoint")
    cli_train, run = _comfy_pack()
    given = {"steps": args.steps, "batch": args.batch, "chunk": args.chunk, "lr": args.lr, "seed": args.seed,
             "val_every": args.val_every, "save_every": args.ckpt_every, "tau": args.tau,
             "gamma_pos": args.gamma_pos, "ema_decay": args.ema_decay}
    settings = run.RunSettings(method=args.method, tokens=args.tokens, blocks=args.blocks or "", layers=args.layers,
                               time_table=args.time, val_fraction=args.val_fraction, val_limit=args.val_limit,
                               gamma_neg=-1.0 if args.gamma_neg is None else args.gamma_neg,
                               precision="bf16" if args.dtype == "bf16" else "auto",
                               gradient_checkpointing=args.grad_checkpointing,
                               **{k: v for k, v in given.items() if v is not None})
    print(f"ComfyUI route: {_comfyui_root()}")
    res, files = cli_train.train_checkpoint(source, data, args.out, settings, size=args.size, cache=args.cache,
                                            resume=args.resume, overwrite=args.overwrite,
                                            progress=not args.no_progress)
    return _report(res, files, settings.config())


def cmd_score(args) -> int:
    source = _source(args)
    data = _existing(args.data, "dataset")
    if args.tokens:
        _existing(args.tokens, "token file")
    ts = tuple(int(t) for t in args.ts.split(",") if t.strip())
    if args.group < 2 or args.limit < args.group:
        raise ValueError(f"need --group >= 2 and --limit >= --group, got {args.group}, {args.limit}")
    _source_arch(args, source)

    import json

    from .cache import EncodeCache
    from .datasets import open_dataset
    from .score import alignment_score, format_score

    tokens = load_tokens(args.tokens) if args.tokens else None
    backend, encoders = _load(args)
    ds = open_dataset(data, size=args.size, caption_mode="first")
    x0, cond = EncodeCache(encoders, root=args.cache).first_caption_pairs(ds, args.limit)
    res = alignment_score(backend, tokens, x0, cond, group=args.group, ts=ts, seed=args.seed, chunk=args.chunk)
    print(json.dumps(res, indent=1) if args.json else format_score(res))
    return 0


def main(argv=None) -> int:
    args = build_parser().parse_args(argv)
    from .distributed import RankFailure

    try:
        return args.fn(args)
    except (ValueError, FileExistsError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    except RankFailure as e:
        print("\n".join([f"error: {e}"] + list(getattr(e, "__notes__", []))), file=sys.stderr)
        return 1
