"""``python -m training train --ckpt FILE`` through ComfyUI: its own checkpoint loader, this pack's
ComfyUI backend and the same run function as the Train Soft Tokens node (nodes/train_run.py), so
the token file equals the one the node writes for the same settings, data and seed.
"""

from __future__ import annotations

from ..training.checkpoint import RunFiles
from ..training.datasets import open_dataset
from .comfy_data import encode_dataset, summary_text
from .train_run import RunSettings, check_run, train_on_model


def load_checkpoint_file(path):
    """(MODEL, CLIP, VAE) of a single-file checkpoint, through ComfyUI's CheckpointLoaderSimple code."""
    import comfy.sd

    try:
        out = comfy.sd.load_checkpoint_guess_config(str(path), output_vae=True, output_clip=True)
    except RuntimeError as e:  # e.g. "Could not detect model type"
        raise ValueError(f"{path}: ComfyUI could not load this checkpoint ({str(e).strip().splitlines()[0]})") from e
    model, clip, vae = out[:3]
    if model is None or clip is None or vae is None:
        raise ValueError(f"{path}: ComfyUI found no complete checkpoint (model, text encoder and VAE) in this file")
    return model, clip, vae


def train_checkpoint(ckpt, data, out, settings: RunSettings, *, size: int = 512, cache=None, resume=None,
                     overwrite: bool = False, progress: bool = True):
    """Train soft tokens for a checkpoint file on a dataset path; returns (TrainResult, RunFiles)."""
    settings.check()
    files = RunFiles.of(out)
    if resume is None:
        files.check_new(overwrite)
    ds = open_dataset(data, size=size)
    model, clip, vae = load_checkpoint_file(ckpt)
    encoded = encode_dataset(ds, clip, vae, cache)  # cache None: in memory, as the CLI default
    print(summary_text(encoded.report))
    plan = check_run(model, encoded, settings, files, resume=resume, overwrite=overwrite)
    return train_on_model(model, encoded, plan, progress=progress), files
