"""One soft-token training run on a ComfyUI MODEL: what the Train node and ``python -m training
train --ckpt`` (with ComfyUI installed) both call, so both write the same token file.

``check_run`` validates everything it can before any heavy work (family, dataset match, batch
size against the dataset, settings, output and resume files); ``train_on_model`` then builds the
layout, the ComfyUI backend and the engine's ``Trainer`` and runs it.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from pathlib import Path

import torch

from ..training.checkpoint import RunFiles, load_checkpoint, numbered_run
from ..training.datasets import split_dataset
from ..training.layouts import TokenLayout, default_blocks, parse_blocks, uses_time_table
from ..training.tokens import SoftTokens
from ..training.trainer import RESUME_MUTABLE, DatasetData, TrainConfig, Trainer, bos_init
from .comfy_backend import ComfyBackend, model_arch, prediction_of
from .comfy_data import EncodedDataset, fingerprint
from .patch import model_facts

INIT_CHOICES = ("official", "random", "null-text")
PRECISIONS = ("auto", "bf16")


@dataclass
class RunSettings:
    """The user's choices for one run (node inputs or CLI flags). 0 / -1 / "" mean the official default.

    Defaults are the CLI's (official: TrainConfig); the node sets its own UX defaults in its schema.
    """
    method: str = "softrepa"
    steps: int = 1000
    batch: int = 4
    chunk: int = 0
    lr: float = 1e-3
    tokens: int = 4
    blocks: str = ""
    layers: int = 5
    time_table: str = "official"
    init: str = "official"
    tau: float = 0.07
    scale: float = 4.0
    gamma_pos: float = 1.0
    gamma_neg: float = -1.0
    ema_decay: float = 0.9999
    seed: int = 42
    precision: str = "auto"
    gradient_checkpointing: bool = False
    val_fraction: float = 0.0
    val_every: int = 500
    val_limit: int = 50
    save_every: int = 500

    def config(self) -> TrainConfig:
        """The engine's TrainConfig (checked)."""
        cfg = TrainConfig(method=self.method, steps=self.steps, batch=self.batch, seed=self.seed, lr=self.lr,
                          val_every=self.val_every, ckpt_every=self.save_every, chunk=self.chunk or None,
                          scale=self.scale, tau=self.tau, gamma_pos=self.gamma_pos,
                          gamma_neg=None if self.gamma_neg < 0 else self.gamma_neg, ema_decay=self.ema_decay)
        cfg.check()
        return cfg

    def layout(self, model) -> TokenLayout:
        """The token layout for this model (widths from the model, blocks/time from the settings)."""
        arch, facts = model_arch(model), model_facts(model)
        blocks = parse_blocks(self.blocks) if self.blocks.strip() else default_blocks(arch, self.method, self.layers)
        time_on = uses_time_table(arch, self.method, self.time_table)
        width = facts["text_width"]
        layout = TokenLayout(arch=arch, method=self.method, n_tokens=self.tokens, width=width, text_width=width,
                             blocks=tuple(blocks), time_buckets=100 if time_on else 0)
        layout.check_model(facts["family"], facts["text_width"], facts.get("n_blocks"), facts.get("embed_width"),
                           name="the chosen layout", model_arch=facts.get("arch"))
        return layout

    def check(self) -> None:
        if self.init not in INIT_CHOICES:
            raise ValueError(f"init must be one of {INIT_CHOICES}, got {self.init!r}")
        uses_time_table("sd15", self.method, self.time_table)  # checks the choice
        if self.precision not in PRECISIONS:
            raise ValueError(f"precision must be one of {PRECISIONS}, got {self.precision!r}")
        if not 0.0 <= self.val_fraction < 1.0:
            raise ValueError(f"validation fraction must be in [0, 1), got {self.val_fraction}")
        if not 0.0 <= self.ema_decay <= 1.0:
            raise ValueError(f"EMA decay must be in [0, 1], got {self.ema_decay}")
        self.config()

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class Plan:
    """Everything ``check_run`` decided; ``train_on_model`` runs it."""
    settings: RunSettings
    cfg: TrainConfig
    layout: TokenLayout
    files: RunFiles
    train: object
    val: object
    resume: Path | None
    arch: str


def run_files(folder, name: str = "", resume=None) -> RunFiles:
    """The run's files: a new numbered run ``name`` in ``folder``, or the files of the run being resumed."""
    if resume is not None:
        resume = Path(resume)
        if not resume.name.endswith(".ckpt.pt"):
            raise ValueError(f"{resume.name} is not a training checkpoint (*.ckpt.pt)")
        return RunFiles.of(resume.with_name(resume.name[:-len(".ckpt.pt")] + ".safetensors"))
    return RunFiles.of(numbered_run(folder, name))


def check_run(model, data: EncodedDataset, settings: RunSettings, files: RunFiles, resume=None,
              overwrite: bool = False) -> Plan:
    """Validate a run before any heavy work; ValueError (or FileExistsError) with a clear message."""
    settings.check()
    prediction_of(model.get_model_object("model_sampling"))
    arch = model_arch(model)
    data.check_model(model)
    cfg = settings.config()
    if resume is not None:
        state = load_checkpoint(resume)
        layout = TokenLayout.from_json(state["layout"])
        facts = model_facts(model)
        layout.check_model(facts["family"], facts["text_width"], facts.get("n_blocks"), facts.get("embed_width"),
                           name=f"checkpoint {Path(resume).name}", model_arch=facts.get("arch"))
        saved, mine = state["config"], cfg.resolved(layout).to_dict()
        diff = [f"{k} {saved[k]!r} -> {mine[k]!r}" for k in saved if k not in RESUME_MUTABLE and saved[k] != mine[k]]
        if diff:
            raise ValueError("resuming continues the checkpoint's run; only the steps and the save interval may "
                             "change, but these differ: " + ", ".join(diff))
        if cfg.steps <= state["step"]:
            raise ValueError(f"the checkpoint is already at step {state['step']}; set steps above it to continue")
    else:
        layout = settings.layout(model)
        files.check_new(overwrite)
    train, val = split_dataset(data.dataset, settings.val_fraction, seed=cfg.seed)
    if len(train) < cfg.batch:
        raise ValueError(f"images per step B = {cfg.batch} is larger than the training set ({len(train)} samples "
                         f"after holding out {0 if val is None else val.n_images} for validation); lower B or "
                         "add images")
    group = cfg.score_group or cfg.batch
    if val is not None and min(val.n_images, settings.val_limit) < group:
        raise ValueError(f"validation needs at least {group} held-out images (one group of candidates for the "
                         f"alignment score); got {min(val.n_images, settings.val_limit)}. Raise the validation "
                         "fraction, or set it to 0 to train without validation")
    return Plan(settings, cfg, layout, files, train, val, Path(resume) if resume is not None else None, arch)


class _LatentIn(DatasetData):
    """Training batches with the raw VAE latents mapped into the model's space."""

    def __init__(self, dataset, cache, batch, seed, latent_in):
        super().__init__(dataset, cache, batch, seed)
        self.latent_in = latent_in

    def batch(self, step, generator=None):
        x0, cond = super().batch(step, generator)
        return self.latent_in(x0), cond


def val_pairs(data: EncodedDataset, dataset, limit: int, latent_in) -> tuple:
    """(x0, cond) of the first ``limit`` images of ``dataset`` with their first captions, in the model's space."""
    x0, cond = data.cache.first_caption_pairs(dataset, limit)
    return latent_in(x0), cond


def train_on_model(model, data: EncodedDataset, plan: Plan, on_step=None, progress: bool = False):
    """Run a checked plan on a ComfyUI MODEL; returns the engine's TrainResult.

    ``on_step(step, total, loss, metrics, history=...)`` follows the trainer's callback (plus the
    history so far); returning False or raising ``Cancelled`` stops with a saved partial result.
    """
    s, cfg, layout = plan.settings, plan.cfg, plan.layout
    latent_in = model.model.process_latent_in
    init = None
    if plan.resume is None and (s.init == "null-text" or (s.init == "official" and plan.arch == "sd15")):
        init = bos_init(data.cache.encoders.encode_text([""])["context"])
    meta = {"base_model": model_identity(model), "arch": plan.arch, "data": data.dataset.source,
            "data_report": data.report, "settings": s.to_dict()}
    backend = ComfyBackend(model, SoftTokens(layout), gradient_checkpointing=s.gradient_checkpointing,
                           autocast_dtype=torch.bfloat16 if s.precision == "bf16" else None)
    with backend.session():
        val = val_pairs(data, plan.val, s.val_limit, latent_in) if plan.val is not None else None
        trainer = Trainer(backend, layout, _LatentIn(plan.train, data.cache, cfg.batch, cfg.seed, latent_in), cfg,
                          plan.files.out, val=val, init_static=init, resume=plan.resume, meta=meta,
                          on_step=None if on_step is None else lambda *a: on_step(*a, history=trainer.history),
                          progress=progress)
        return trainer.run()


def model_identity(model) -> str:
    """The base-model identifier stored with trained tokens: model class and a weight fingerprint."""
    return f"{type(model.model).__name__}:{fingerprint(model.model.diffusion_model)}"
