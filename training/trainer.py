"""The training loop: SoftREPA or AGSM soft tokens on a frozen backbone (ALGORITHMS 2.4, 3.4, 9).

Per step: a batch of B images with their B captions, one integer t ~ U{t_min..t_max-1} and one
noise tensor (1, C, h, w) shared by every pair; ``softrepa_step`` or ``agsm_step`` accumulates
the token gradient; AdamW steps on the token parameters only; AGSM then updates its EMA tokens.
With ``accum`` > 1 a step runs that many such batches (each its own B x B matrix, t and noise,
data indices step * accum + j) and averages their gradients before the one optimizer step.
Every ``val_every`` steps (the official ``num_iter``) the alignment score is measured on the
held-out pairs and the cosine warm-restart LR schedule steps once (pitfall 17).

Determinism: one ``torch.Generator`` (seeded by ``seed``) draws the initial tokens, the EMA
tokens, t, the noise and any latent sampling, in that order; the data order is a function of
(seed, step). The checkpoint stores the generator state, so a resumed run reproduces the
uninterrupted one bit for bit (on the same device and thread count).

Failures never lose work: a non-finite loss or gradient skips the step (no optimizer or EMA
update); ``max_bad_steps`` skips in a row stop training with the last good tokens saved. A
callback returning False, or raising ``Cancelled``, stops cleanly and saves a partial result;
any other exception saves the run as of its last completed step before it propagates.

fp16: when the backend computes in float16 (``_computes_in_fp16``) the trainer scales the loss
dynamically (``LossScaler``, torch.amp.GradScaler's rules on the token parameters): the
objectives backpropagate loss * scale, the gradients are divided by the scale before the finite
check and the optimizer step, a step whose loss is finite but whose scaled gradients overflowed
is skipped and halves the scale (an overflow, not a bad step: it does not count toward
``max_bad_steps``), and every ``growth_interval`` good steps in a row double it. The scale is
recorded per step and kept in the checkpoint. fp32 and bf16 runs are unchanged (scale 1).

Several processes (``torchrun``, ``dist``): every rank runs this loop on the same batch, t and
noise, evaluates its share of the image rows, and one all-reduce per step sums the token
gradients (training/distributed.py); only rank 0 writes files.
"""

from __future__ import annotations

import dataclasses
import json
import math
import time
from dataclasses import dataclass, field

import torch

from .checkpoint import RunFiles, load_checkpoint, save_checkpoint, signals_held, write_json
from .distributed import SINGLE, Dist
from .formats import save_tokens
from .layouts import MMDIT, TokenLayout
from .objectives import agsm_step, ema_update, new_ema_tokens, softrepa_step
from .score import DEFAULT_TS, alignment_score
from .tokens import SoftTokens

METHODS = ("softrepa", "agsm")
# Config fields a resumed run may change: they do not alter the result of the steps run.
RESUME_MUTABLE = ("steps", "ckpt_every")


class Cancelled(Exception):
    """Raised by an ``on_step`` callback (or the caller) to stop training cleanly."""


@dataclass
class TrainConfig:
    """Everything that decides a training run's result (stored with checkpoints and token files).

    Defaults are the official ones (ALGORITHMS 2.4, 3.4, 4). ``val_every`` is the official
    ``num_iter``: validation interval and, with ``lr_every`` = 0, the LR scheduler's step
    interval. ``gamma_neg`` None means 1.0 for UNets and 0.1 for SD3. ``score_group`` 0 means
    ``batch``.
    """

    method: str = "softrepa"
    steps: int = 1000
    batch: int = 4
    # batches per optimizer step: each is its own B x B matrix (own t and noise), their gradients averaged
    accum: int = 1
    seed: int = 42
    lr: float = 1e-3
    betas: tuple = (0.9, 0.999)
    eps: float = 1e-8
    weight_decay: float = 1e-4
    sched_t0: int = 10
    eta_min: float = 1e-5
    val_every: int = 500
    lr_every: int = 0
    ckpt_every: int = 500
    t_min: int = 0
    t_max: int = 1000
    chunk: int | None = None
    # SoftREPA
    scale: float = 4.0
    tau: float = 0.07
    dweight: float = 0.0
    # AGSM
    gamma_pos: float = 1.0
    gamma_neg: float | None = None
    temp: float = 0.1
    ema_decay: float = 0.9999
    # guards and validation
    max_bad_steps: int = 5
    score_ts: tuple = DEFAULT_TS
    score_group: int = 0
    score_seed: int = 0

    def check(self) -> None:
        """Raise ValueError for impossible settings (before any heavy work)."""
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; expected one of {METHODS}")
        for name in ("steps", "batch", "accum", "val_every", "sched_t0", "max_bad_steps"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        if self.batch < 2:
            raise ValueError(f"batch must be at least 2 images (contrastive pairs), got {self.batch}")
        if self.lr_every < 0 or self.ckpt_every < 0:
            raise ValueError("lr_every and ckpt_every must be >= 0 (0 = official cadence / no periodic checkpoints)")
        if not 0 <= self.t_min < self.t_max <= 1000:
            raise ValueError(f"need 0 <= t_min < t_max <= 1000, got {self.t_min}, {self.t_max}")
        if self.lr <= 0:
            raise ValueError(f"lr must be positive, got {self.lr}")
        if self.score_group == 1 or self.score_group < 0:
            raise ValueError(f"score_group must be 0 (= batch) or at least 2, got {self.score_group}")

    def resolved(self, layout: TokenLayout) -> "TrainConfig":
        """A copy with the layout-dependent defaults filled in (gamma_neg, score_group)."""
        gamma_neg = self.gamma_neg
        if gamma_neg is None:
            gamma_neg = 0.1 if layout.family == MMDIT else 1.0
        return dataclasses.replace(self, gamma_neg=gamma_neg, score_group=self.score_group or self.batch,
                                   betas=tuple(self.betas), score_ts=tuple(self.score_ts))

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "TrainConfig":
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = sorted(set(d) - names)
        if unknown:
            raise ValueError(f"unknown training config keys {unknown}")
        d = dict(d)
        for k in ("betas", "score_ts"):
            if k in d:
                d[k] = tuple(d[k])
        return cls(**d)


@dataclass
class TrainResult:
    """What a run ended with: ``stopped`` is "done", "cancelled" or "nan"."""
    tokens: SoftTokens
    step: int
    stopped: str
    files: RunFiles
    history: dict = field(repr=False)
    best: dict | None = None


# --- data ---------------------------------------------------------------------------------

class TensorData:
    """Training pairs held in memory: x0 (N, C, h, w) and cond rows (row i = image i's caption).

    Step s uses batch s mod (N // batch) of epoch s // (N // batch); every epoch's order is a
    permutation drawn from (seed, epoch), so any step's batch is known without replaying.
    """

    def __init__(self, x0: torch.Tensor, cond: dict, batch: int, seed: int = 0):
        n = x0.shape[0]
        if any(v.shape[0] != n for v in cond.values()):
            raise ValueError(f"cond must hold one row per image ({n}), got {({k: v.shape[0] for k, v in cond.items()})}")
        if n < batch:
            raise ValueError(f"{n} training pairs are fewer than the batch size {batch}")
        self.x0, self.cond, self.batch_size, self.seed = x0, cond, batch, seed
        self.per_epoch = n // batch  # drop_last, as the official loaders

    def batch(self, step: int, generator: torch.Generator | None = None):
        epoch, k = divmod(step, self.per_epoch)
        gen = torch.Generator().manual_seed(self.seed * 100003 + epoch)  # one stream per (seed, epoch)
        perm = torch.randperm(self.x0.shape[0], generator=gen)
        idx = perm[k * self.batch_size:(k + 1) * self.batch_size]
        return self.x0[idx], {name: v[idx] for name, v in self.cond.items()}


class DatasetData:
    """Training batches from a ``CaptionDataset`` through an ``EncodeCache`` (latents + text).

    The order comes from ``dataset.batches(batch, seed, start_step)``, a function of (seed,
    step); latents are sampled from the cached moments with the trainer's generator.
    """

    def __init__(self, dataset, cache, batch: int, seed: int = 0, device=None):
        self.dataset, self.cache, self.batch_size, self.seed, self.device = dataset, cache, batch, seed, device
        self._it, self._next = None, None

    def batch(self, step: int, generator: torch.Generator | None = None):
        if self._it is None or step != self._next:
            self._it = self.dataset.batches(self.batch_size, seed=self.seed, start_step=step)
        b = next(self._it)
        self._next = step + 1
        x0, cond, _ = self.cache.batch(self.dataset, b, generator=generator, device=self.device)
        return x0, cond


# --- initialisation -----------------------------------------------------------------------

def bos_init(context: torch.Tensor) -> torch.Tensor:
    """SD1.5 null-text init (ALGORITHMS 1.6): the BOS row (position 0) of encode("")'s context.

    context: (1, n, d) or (n, d). Returns (d,), which the trainer repeats over every token (and
    both AGSM polarities) of the static part.
    """
    if context.ndim == 3:
        context = context[0]
    if context.ndim != 2:
        raise ValueError(f"expected an encoded prompt (1, n, d) or (n, d), got shape {tuple(context.shape)}")
    return context[0].detach().float().cpu().clone()


def make_tokens(layout: TokenLayout, generator: torch.Generator, init_static=None) -> SoftTokens:
    """Fresh tokens: N(0, 0.02) everywhere, or ``init_static`` (broadcast to the static shape,
    e.g. a (d,) BOS row) for the static part with an N(0, 0.02) time table.

    init_static may be a tensor or a callable ``layout -> tensor``.
    """
    if callable(init_static):
        init_static = init_static(layout)
    if init_static is None:
        return SoftTokens(layout, generator=generator)
    init = torch.as_tensor(init_static).detach().float().cpu()
    while init.ndim < 4:
        init = init.unsqueeze(0)
    try:
        static = init.expand(layout.static_shape).clone()
    except RuntimeError as e:
        raise ValueError(f"init_static of shape {tuple(torch.as_tensor(init_static).shape)} does not broadcast "
                         f"to the static tokens {layout.static_shape}") from e
    return SoftTokens(layout, static=static, generator=generator)


# --- fp16 loss scaling --------------------------------------------------------------------

def _computes_in_fp16(backend) -> bool:
    """True when the backend's denoiser computes in float16 (its ``compute_dtype``): small
    gradients then underflow unless the loss is scaled."""
    return getattr(backend, "compute_dtype", None) == torch.float16


class LossScaler:
    """Dynamic loss scaling with torch.amp.GradScaler's rules, for the token parameters.

    The objectives multiply the backpropagated loss by ``scale`` themselves (``grad_scale``);
    ``unscale_`` divides the gradients by it before the finite check and the optimizer step.
    ``update(overflow=True)`` (a finite loss whose scaled gradients were not finite) multiplies
    the scale by ``backoff_factor``; ``update(overflow=False)`` counts a good step, and every
    ``growth_interval`` good steps in a row multiply it by ``growth_factor``. Unlike GradScaler,
    the scale stops at ``min_scale`` (1): gradients that are not finite even unscaled are not an
    overflow caused by scaling (``can_back_off`` is False) and the trainer counts a bad step.
    Disabled (fp32/bf16), the scale is 1 and every method is a no-op.
    """

    def __init__(self, enabled: bool = True, init_scale: float = 2.0 ** 16, growth_factor: float = 2.0,
                 backoff_factor: float = 0.5, growth_interval: int = 2000, min_scale: float = 1.0):
        if not (growth_factor > 1.0 and 0.0 < backoff_factor < 1.0 and growth_interval >= 1
                and 0.0 < min_scale <= init_scale and math.isfinite(init_scale)):
            raise ValueError("need growth_factor > 1, 0 < backoff_factor < 1, growth_interval >= 1 and "
                             f"0 < min_scale <= init_scale < inf; got {growth_factor}, {backoff_factor}, "
                             f"{growth_interval}, {min_scale}, {init_scale}")
        self.enabled = bool(enabled)
        self.scale = float(init_scale) if self.enabled else 1.0
        self.growth_factor, self.backoff_factor = float(growth_factor), float(backoff_factor)
        self.growth_interval, self.min_scale = int(growth_interval), float(min_scale)
        self.growth_tracker = 0  # good steps in a row since the last change of scale
        self.overflows = 0  # steps skipped because the scaled gradients overflowed

    def unscale_(self, params) -> None:
        """Divide the parameters' gradients by the scale, in place."""
        if self.enabled and self.scale != 1.0:
            for p in params:
                if p.grad is not None:
                    p.grad.div_(self.scale)

    def can_back_off(self) -> bool:
        """Whether non-finite gradients with a finite loss can be blamed on the scale (scale > min)."""
        return self.enabled and self.scale > self.min_scale

    def update(self, overflow: bool) -> None:
        """After a step: back off on an overflow; count a good step and grow after growth_interval."""
        if not self.enabled:
            return
        if overflow:
            self.scale = max(self.scale * self.backoff_factor, self.min_scale)
            self.growth_tracker = 0
            self.overflows += 1
            return
        self.growth_tracker += 1
        if self.growth_tracker == self.growth_interval:
            grown = self.scale * self.growth_factor
            if math.isfinite(grown):
                self.scale = grown
            self.growth_tracker = 0

    def state_dict(self) -> dict:
        return dict(vars(self))

    def load_state_dict(self, state: dict) -> None:
        self.__dict__.update(state)


# --- the trainer --------------------------------------------------------------------------

class Trainer:
    """One training run of soft tokens; ``run()`` trains until ``cfg.steps`` or a stop.

    Args:
        backend: a Backend (training/backend.py).
        layout: the tokens' layout (its method must match ``cfg.method``).
        data: ``batch(step, generator) -> (x0 (B, C, h, w), cond)`` with B = cfg.batch, e.g.
            ``TensorData`` or ``DatasetData``.
        cfg: TrainConfig.
        out: the output .safetensors; checkpoint, best tokens and history go beside it.
        val: (x0, cond) held-out pairs for the alignment score, or None (no validation).
        init_static: static-token init (see ``make_tokens``), e.g. ``bos_init(...)`` for SD1.5.
        resume: a checkpoint path to continue from (config must match except RESUME_MUTABLE).
        on_step: ``fn(step, total, loss, metrics)`` after every step (loss None for a skipped
            non-finite step, the finite loss for a step skipped by an fp16 overflow; metrics {}
            except after a validation); False or ``Cancelled`` stops.
        overwrite: allow a fresh run to replace existing run files.
        meta: extra facts stored in the token file's train_config (model and data paths, ...).
        progress: show a tqdm progress bar.
        loss_scaler: a ``LossScaler``; None scales dynamically exactly when the backend computes
            in fp16 (``_computes_in_fp16``). A resumed run continues with the checkpoint's scaler.
        dist: this process's ``Dist`` in a ``torchrun`` job (training/distributed.py): every rank
            runs the same Trainer on the same data; each evaluates its share of the image rows and
            of the validation groups, one all-reduce per step sums the token gradients, and only
            rank 0 writes files (and shows progress). ``resume`` may then be the loaded
            checkpoint dict (rank 0's, broadcast). None = one process.
    """

    def __init__(self, backend, layout: TokenLayout, data, cfg: TrainConfig, out, *, val=None, init_static=None,
                 resume=None, on_step=None, overwrite: bool = False, meta: dict | None = None,
                 progress: bool = True, loss_scaler: LossScaler | None = None, dist: Dist | None = None):
        cfg.check()
        if layout.method != cfg.method:
            raise ValueError(f"the layout is for {layout.method} but the config trains {cfg.method}")
        self.dist = dist or SINGLE
        self.files = RunFiles.of(out)
        state = None
        if resume is not None:
            state = resume if isinstance(resume, dict) else load_checkpoint(resume)
            self._check_resume(state, layout, cfg)
        elif self.dist.is_main:  # only rank 0 writes, so only its files count
            self.files.check_new(overwrite)
        self.backend, self.layout, self.data = backend, layout, data
        self.cfg = cfg.resolved(layout)
        self.val, self.on_step, self.meta = val, on_step, dict(meta or {})
        self.progress = progress and self.dist.is_main

        if val is not None and val[0].shape[0] < self.cfg.score_group:
            raise ValueError(f"the validation set has {val[0].shape[0]} pairs, fewer than one group of "
                             f"{self.cfg.score_group} candidates for the alignment score")

        # Drawn on the CPU from one generator (device-independent init), then moved to the model.
        self.device = getattr(backend, "device", None)
        self.gen = torch.Generator().manual_seed(self.cfg.seed)
        self.tokens = make_tokens(layout, self.gen, init_static).to(self.device)
        self.ema = new_ema_tokens(layout, self.gen).to(self.device) if self.cfg.method == "agsm" else None
        # Explicit selection: the token module's own two tensors, one param group each (pitfall 24).
        self.params = [p for p in (self.tokens.static, self.tokens.time) if p is not None]
        self.opt = torch.optim.AdamW([{"params": [p]} for p in self.params], lr=self.cfg.lr,
                                     betas=self.cfg.betas, eps=self.cfg.eps, weight_decay=self.cfg.weight_decay)
        self.sched = torch.optim.lr_scheduler.CosineAnnealingWarmRestarts(
            self.opt, T_0=self.cfg.sched_t0, T_mult=1, eta_min=self.cfg.eta_min)
        self.step = 0
        self.bad_run = 0
        self.bad_total = 0
        self.history = {"steps": [], "val": []}
        self.best = None
        self.base_score = None
        self.scaler = loss_scaler if loss_scaler is not None else LossScaler(enabled=_computes_in_fp16(backend))
        if state is not None:
            self._restore(state)

    # --- resume --------------------------------------------------------------------------
    def _check_resume(self, state: dict, layout: TokenLayout, cfg: TrainConfig) -> None:
        saved_layout = TokenLayout.from_json(state["layout"])
        if saved_layout != layout:
            raise ValueError(f"the checkpoint trains {saved_layout.describe()}, not {layout.describe()}")
        saved = TrainConfig.from_dict(state["config"])
        mine = cfg.resolved(layout).to_dict()
        diff = [k for k, v in saved.to_dict().items() if k not in RESUME_MUTABLE and mine[k] != v]
        if diff:
            raise ValueError("cannot resume with a different configuration: "
                             + ", ".join(f"{k} {saved.to_dict()[k]!r} -> {mine[k]!r}" for k in diff))
        if cfg.steps < state["step"]:
            raise ValueError(f"the checkpoint is already at step {state['step']}, beyond steps={cfg.steps}")

    def _restore(self, state: dict) -> None:
        with torch.no_grad():
            for tok, saved in ((self.tokens, state["tokens"]), (self.ema, state.get("ema"))):
                if tok is None:
                    continue
                tok.static.copy_(saved["static"])
                if tok.time is not None:
                    tok.time.copy_(saved["time"])
        self.opt.load_state_dict(state["optimizer"])
        self.sched.load_state_dict(state["scheduler"])
        self.gen.set_state(state["rng"])
        self.step = int(state["step"])
        self.bad_run, self.bad_total = int(state["bad_run"]), int(state["bad_total"])
        self.history = state["history"]
        self.best = state["best"]
        self.base_score = state["base_score"]
        # Checkpoints from before loss scaling, or from a run without it, leave a fresh scaler.
        saved_scaler = state.get("scaler")
        if saved_scaler and saved_scaler.get("enabled") and self.scaler.enabled:
            self.scaler.load_state_dict(saved_scaler)
        if self.step != int(state["data_position"]):
            raise ValueError("corrupt checkpoint: data position and step disagree")

    def state_dict(self) -> dict:
        """Everything needed to continue this run exactly (see checkpoint.py)."""
        def tok_state(tok):
            if tok is None:
                return None
            return {"static": tok.static.detach().cpu().clone(),
                    "time": None if tok.time is None else tok.time.detach().cpu().clone()}
        return {"layout": self.layout.to_json(), "config": self.cfg.to_dict(), "step": self.step,
                "data_position": self.step, "tokens": tok_state(self.tokens), "ema": tok_state(self.ema),
                "optimizer": self.opt.state_dict(), "scheduler": self.sched.state_dict(),
                "rng": self.gen.get_state(), "bad_run": self.bad_run, "bad_total": self.bad_total,
                "history": self.history, "best": self.best, "base_score": self.base_score, "meta": self.meta,
                "scaler": self.scaler.state_dict()}

    # --- one step ------------------------------------------------------------------------
    def train_step(self) -> dict:
        """Run step ``self.step``: returns {"loss", "t", "skipped", "lr"} (with fp16 loss scaling
        also "scale", the scale this step used, and "overflow"); advances ``self.step``. With
        ``accum`` > 1, "t" is the list of its batches' t and "loss" their mean."""
        cfg, gen, scaler = self.cfg, self.gen, self.scaler
        self.opt.zero_grad(set_to_none=True)
        scale = scaler.scale  # 1.0 without loss scaling: x * 1.0 is exact, results are unchanged
        rows = self.dist.rows(cfg.batch) if self.dist.enabled else None
        loss, ts = 0.0, []
        for j in range(cfg.accum):  # data indices step * accum ... step * accum + accum - 1
            x0, cond = self.data.batch(self.step * cfg.accum + j, gen)
            if x0.shape[0] != cfg.batch:
                raise ValueError(f"the data gave {x0.shape[0]} images for a batch of {cfg.batch}")
            if self.device is not None:
                x0, cond = x0.to(self.device), {k: v.to(self.device) for k, v in cond.items()}
            t = int(torch.randint(cfg.t_min, cfg.t_max, (1,), generator=gen))
            noise = torch.randn((1,) + tuple(x0.shape[1:]), generator=gen).to(x0.device, x0.dtype)
            if cfg.method == "softrepa":
                out = softrepa_step(self.backend, self.tokens, x0, cond, t, noise, scale=cfg.scale, tau=cfg.tau,
                                    dweight=cfg.dweight, chunk=cfg.chunk, grad_scale=scale / cfg.accum, rows=rows)
            else:
                out = agsm_step(self.backend, self.tokens, self.ema, x0, cond, t, noise, gamma_pos=cfg.gamma_pos,
                                gamma_neg=cfg.gamma_neg, temp=cfg.temp, chunk=cfg.chunk, grad_scale=scale / cfg.accum,
                                rows=rows)
            loss += float(out["loss"]) / cfg.accum
            ts.append(t)
        t = ts[0] if cfg.accum == 1 else ts
        if self.dist.enabled:
            loss = self._all_reduce_step(loss)
        loss_finite = math.isfinite(loss)
        if loss_finite:
            scaler.unscale_(self.params)
        finite = loss_finite and all(p.grad is None or bool(torch.isfinite(p.grad).all()) for p in self.params)
        # A finite loss whose scaled gradients overflowed: skip, lower the scale; not a bad step.
        overflow = not finite and loss_finite and scaler.can_back_off()
        if finite:
            self.opt.step()
            if self.ema is not None:
                ema_update(self.ema, self.tokens, cfg.ema_decay)
            self.bad_run = 0
            scaler.update(overflow=False)
        elif overflow:
            scaler.update(overflow=True)  # neither counts toward nor resets the bad-step run
        else:
            self.bad_run += 1
            self.bad_total += 1
        self.opt.zero_grad(set_to_none=True)
        self.step += 1
        lr_every = cfg.lr_every or cfg.val_every
        if self.step % lr_every == 0:
            self.sched.step()
        rec = {"step": self.step, "loss": loss if finite or overflow else None, "t": t, "skipped": not finite,
               "lr": self.opt.param_groups[0]["lr"]}
        if scaler.enabled:
            rec.update(scale=scale, overflow=overflow)
        self.history["steps"].append(rec)
        return rec

    def _all_reduce_step(self, loss: float) -> float:
        """Sum this rank's token gradients and partial loss over the ranks, in one all-reduce.

        The rows' losses are already divided by the global B, so the sums are the whole batch's
        gradient and loss. A non-finite value on any rank makes the sum non-finite on every
        rank, so all ranks skip (or back off) the same steps.
        """
        grads = [p.grad if p.grad is not None else torch.zeros_like(p) for p in self.params]
        buf = torch.cat([g.reshape(-1).float() for g in grads] + [torch.tensor([loss], device=grads[0].device)])
        self.dist.all_reduce_sum_(buf, what=f"the gradient all-reduce of step {self.step + 1}")
        offset = 0
        for p, g in zip(self.params, grads):
            p.grad = buf[offset:offset + g.numel()].view_as(p).to(p.dtype)
            offset += g.numel()
        return buf[-1].item()

    # --- validation ----------------------------------------------------------------------
    def validate(self) -> dict:
        """Alignment score on the held-out pairs; keeps the best tokens. {} without val data."""
        if self.val is None:
            return {}
        cfg = self.cfg
        x0, cond = self.val
        kw = dict(group=cfg.score_group, ts=cfg.score_ts, seed=cfg.score_seed, chunk=cfg.chunk,
                  dist=self.dist if self.dist.enabled else None)
        if self.base_score is None:
            base = alignment_score(self.backend, None, x0, cond, **kw)
            self.base_score = {"accuracy_base": base["accuracy_base"], "error_base": base["error_base"]}
        s = alignment_score(self.backend, self.tokens, x0, cond, base=False, **kw)
        metrics = {"step": self.step, "accuracy": s["accuracy"], "error": s["error"], **self.base_score}
        self.history["val"].append(metrics)
        b = self.best
        if b is None or (s["accuracy"], -s["error"]) > (b["accuracy"], -b["error"]):
            self.best = dict(metrics)
            if self.dist.is_main:
                save_tokens(self.tokens, self.files.best, train_config=self._train_config("best", metrics))
        return metrics

    # --- saving --------------------------------------------------------------------------
    def _train_config(self, status: str, val: dict | None = None) -> dict:
        sc = self.scaler
        scaling = {"loss_scale": sc.scale, "overflow_steps": sc.overflows} if sc.enabled else {}
        return {**self.cfg.to_dict(), **self.meta, "status": status, "steps_done": self.step,
                "skipped_steps": self.bad_total, **scaling, "val": val if val is not None else self.best}

    def save_checkpoint(self) -> None:
        if not self.dist.is_main:
            return
        save_checkpoint(self.state_dict(), self.files.ckpt)
        self.save_history()

    def save_history(self) -> None:
        write_json({"config": self.cfg.to_dict(), "meta": self.meta, "layout": self.layout.to_json(),
                    "best": self.best, "base": self.base_score, **self.history}, self.files.history)

    def save_tokens(self, status: str) -> None:
        """The token file: full training record in ``train_config``, and the headline facts as their own keys."""
        if not self.dist.is_main:
            return
        last = self.history["val"][-1] if self.history["val"] else None
        self.tokens.meta.setdefault("source", f"trained ({self.cfg.method})")
        self.tokens.meta.update(status=status, steps=self.step,
                                scores=json.dumps({"last": last, "best": self.best, "base": self.base_score}))
        if "base_model" in self.meta:
            self.tokens.meta["base_model"] = self.meta["base_model"]
        save_tokens(self.tokens, self.files.out, train_config=self._train_config(status))

    # --- the loop ------------------------------------------------------------------------
    def run(self) -> TrainResult:
        """Train to ``cfg.steps`` (or until cancelled / too many bad steps); save and return.

        An exception (out of memory, a failing data source, ...) saves the run as it stood after
        its last completed step, marked "error", and is then raised again.
        """
        cfg = self.cfg
        bar = _progress_bar(cfg.steps, self.step) if self.progress else None
        stopped = "done"
        t0 = time.time()
        try:
            while self.step < cfg.steps:
                rng = self.gen.get_state()
                try:
                    rec = self.train_step()
                except BaseException:
                    self.gen.set_state(rng)  # the interrupted step is redone on resume
                    raise
                metrics = self.validate() if self.step % cfg.val_every == 0 else {}
                if cfg.ckpt_every and self.step % cfg.ckpt_every == 0:
                    with signals_held():  # a stop request acts after the save, not inside it
                        self.save_checkpoint()
                if bar is not None:
                    bar.update(1)
                    post = {"loss": "nan" if rec["loss"] is None else f"{rec['loss']:.4f}", "t": rec["t"]}
                    if "scale" in rec:
                        post["scale"] = f"{rec['scale']:g}" + (" overflow" if rec["overflow"] else "")
                    if metrics:
                        post["val_acc"] = f"{metrics['accuracy']:.3f}"
                    bar.set_postfix(post)
                if self.bad_run >= cfg.max_bad_steps:
                    stopped = "nan"
                    break
                if self.on_step is not None and self.on_step(self.step, cfg.steps, rec["loss"], metrics) is False:
                    stopped = "cancelled"
                    break
        except (Cancelled, KeyboardInterrupt):
            stopped = "cancelled"
        except Exception as e:
            try:
                self._finish("error", t0)
                if self.dist.enabled and self.dist.is_main:
                    e.add_note(f"the run was saved as of step {self.step} in {self.files.ckpt}; continue it with "
                               f"--resume {self.files.ckpt}")
            except Exception as save_error:  # e.g. the disk is full: report both
                e.add_note(f"saving the partial result failed too: {save_error}")
            raise
        finally:
            if bar is not None:
                bar.close()
        return self._finish(stopped, t0)

    def _finish(self, stopped: str, t0: float) -> TrainResult:
        """Record how the run ended and save checkpoint and token file."""
        run = {"until": self.step, "stopped": stopped, "seconds": round(time.time() - t0, 3)}
        if self.dist.enabled:
            run["world_size"] = self.dist.world_size
        self.history.setdefault("runs", []).append(run)
        with signals_held(drop=True):  # the run is ending: a stop request must not cut its save short
            self.save_checkpoint()
            self.save_tokens(stopped)
        return TrainResult(self.tokens, self.step, stopped, self.files, self.history, self.best)


def train(backend, layout: TokenLayout, data, cfg: TrainConfig, out, **kwargs) -> TrainResult:
    """Build a ``Trainer`` and run it (keyword arguments as for Trainer)."""
    return Trainer(backend, layout, data, cfg, out, **kwargs).run()


def _progress_bar(total: int, initial: int):
    from tqdm.auto import tqdm

    return tqdm(total=total, initial=initial, desc="soft tokens", unit="step", dynamic_ncols=True)
