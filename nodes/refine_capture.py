"""Step-selected refinement inside ComfyUI sampling (STEP_SELECTION.md; core in training/refine.py).

Three pieces:

- **Subjects** (``subject_info``): the prompt's token pieces and the subjects' positions per text
  stream, computed from ComfyUI's own tokenization and attached to every conditioning dict under
  ``COND_KEY``. Columns of ComfyUI's context: SD1.x/SD2/SDXL = CLIP chunks of 77 (CLIP-L and -G
  side by side in width), SD3 = [CLIP-L/G 77 x chunks ; T5 tokens] along the sequence.
- **Attention capture** (``Capture``): installed only in the model options of the refinement's
  conditional forward. UNet: an ``attn2_patch`` placed after every soft-token patch *arms* the
  capture (key length, which key columns are the prompt's own tokens), and an
  ``optimized_attention_override`` computes softmax(QK^T * scale [+ mask]) from the final q/k/mask
  the real attention function receives (it wraps ``func`` and hands the wrapper to a previous
  override, e.g. the soft tokens' bias) for layers whose query grid is the target grid. MMDiT: a
  ``dit``/``double_block`` replace arms (text and image lengths) around any previous replace, and
  the override keeps the image-query rows x prompt-text columns of the full joint softmax
  (ComfyUI's joint order is [text ; image]). Heads are averaged per layer, layers in ``maps()``.
- **The sampler** (``RefinementSampler``): wraps any ComfyUI ``Sampler``. At the first model call
  whose sigma is at most the chosen step's sigma, it refines the sampler's state tensor in place
  (IterRef on the conditional prompt, ``training.refine.refine_latent``) and the wrapped sampler
  goes on with the same state, history and noise stream. Nothing stays installed afterwards.
"""

from __future__ import annotations

import contextlib
import functools
import logging
import math
from dataclasses import dataclass

import torch
import torch.utils.checkpoint

import comfy.model_management
import comfy.model_patcher
import comfy.model_sampling
import comfy.samplers
import comfy.utils

from ..training.attention_maps import Stream, attention_probs, batch_loss, step_size, subject_positions
from ..training.layouts import MMDIT, UNET
from ..training.refine import RefineSettings, refine_latent
from .patch import _GROUP_OF_BLOCK, _OVERRIDE_KEY, BlockPatch, SoftTokenPatch

COND_KEY = "step_refine"
# The spec's steps: SD1.x/SDXL step 8 of 50 (t = 821, the paper's optimum); SD3 step 5 of 28 (t ~ 930, the
# authors' SAGA intervention step; the paper's SD3 optimum is not published).
DEFAULT_REFINE_AT = {UNET: 8 / 50, MMDIT: 5 / 28}
DEFAULT_DOWNSCALE = 4  # UNet maps at latent / 4: 16x16 for SD1.5 at 512 px, 32x32 for SDXL at 1024 px
SIGMA_TOLERANCE = 1e-5
# k-diffusion samplers whose corrector calls the model at the next sigma within the previous step
NEXT_LEVEL_CORRECTORS = ("sample_heun", "sample_heunpp2", "sample_sa_solver_pece")

logger = logging.getLogger(__name__)


# --- subjects -----------------------------------------------------------------------------------

@dataclass(frozen=True)
class SubjectInfo:
    """What refinement needs from a prompt: per-stream columns, windows and subject positions.

    family: the model family this text encoder feeds (``UNET`` or ``MMDIT``); n_text: the number
    of context columns the encoder produced.
    """

    subjects: tuple
    streams: tuple
    n_text: int
    family: str

    def describe(self) -> str:
        return f"subjects {list(self.subjects)} over {self.n_text} text columns"


def _pieces(sub_tokenizer, chunk) -> list:
    """Piece strings of one token chunk [(id, weight[, word_id]), ...]; embeddings become '<embedding>'."""
    out = []
    for item in chunk:
        tid = item[0]
        if isinstance(tid, int) or (torch.is_tensor(tid) and tid.numel() == 1):
            out.append(sub_tokenizer.tokenizer.convert_ids_to_tokens(int(tid)))
        else:
            out.append("<embedding>")
    return out


def _first(chunk, token_id, start=0):
    for i in range(start, len(chunk)):
        tid = chunk[i][0]
        if isinstance(tid, int) and tid == token_id:
            return i
    return len(chunk)


def subject_info(clip, tokens: dict, subjects: list, n_text: int | None = None) -> SubjectInfo:
    """Subject positions for ``clip.tokenize(text)`` output ``tokens``; ValueError for unknown subjects.

    n_text: the encoded context's column count, checked against the expected layout when given.
    """
    keys = set(tokens)
    tk = clip.tokenizer
    if "t5xxl" in keys and "g" in keys and "l" in keys:  # SD3 triple encoder
        csm = clip.cond_stage_model
        has_clip = getattr(csm, "clip_l", None) is not None or getattr(csm, "clip_g", None) is not None
        has_t5 = getattr(csm, "t5xxl", None) is not None
        streams, col = [], 0
        if has_clip:
            sub, chunks = tk.clip_l, tokens["l"]
            chunk0 = chunks[0]
            window = (1, _first(chunk0, sub.end_token, 1))  # SD3 stops at EOT
            pos = subject_positions(_pieces(sub, chunk0), subjects, window, "CLIP")
            width = min(sum(len(c) for c in tokens["l"]), sum(len(c) for c in tokens["g"]))
            streams.append(Stream((0, width), window, pos))
            col = width
        if has_t5:
            sub = tk.t5xxl
            flat = [t for c in tokens["t5xxl"] for t in c]
            window = (1, _first(flat, sub.end_token, 1))  # the official window drops T5's first token too
            try:
                pos = subject_positions(_pieces(sub, flat), subjects, window, "T5")
            except ValueError as e:
                raise ValueError(f"{e} (the official T5 window starts at the second token: a subject that is the "
                                 f"prompt's first word is not seen; start the prompt with e.g. 'a photo of')") from None
            streams.append(Stream((col, col + len(flat)), window, pos))
            col += len(flat)
        if not streams:
            raise ValueError("this SD3 text encoder has neither CLIP nor T5: nothing to refine with")
        family = MMDIT
    elif keys & {"l", "g", "h"} and keys <= {"l", "g", "h"}:  # SD1.x (l), SD2 (h), SDXL (g + l)
        name = "l" if "l" in keys else ("h" if "h" in keys else "g")
        sub = getattr(tk, f"clip_{name}", None)
        if sub is None or not hasattr(sub, "tokenizer"):
            raise ValueError(f"cannot read this CLIP's tokenizer ({type(tk).__name__})")
        chunks = tokens[name]
        chunk0 = chunks[0]
        window = (1, len(chunk0) - 1)  # drop BOS and the last position, keep EOT and padding (A&E)
        pos = subject_positions(_pieces(sub, chunk0), subjects, window, "CLIP")
        col = sum(len(c) for c in chunks)
        streams = [Stream((0, len(chunk0)), window, pos)]
        family = UNET
    else:
        raise ValueError(f"Step-selected refinement supports SD1.x, SD2, SDXL and SD3 text encoders; this CLIP "
                         f"tokenizes into {sorted(keys)}")
    if n_text is not None and n_text != col:
        raise ValueError(f"the encoded prompt has {n_text} columns, but its tokens give {col}: this text encoder's "
                         f"layout is not supported for refinement")
    return SubjectInfo(tuple(subjects), tuple(streams), col, family)


def attach_subjects(conditioning: list, info: SubjectInfo) -> list:
    """A copy of a CONDITIONING list whose dicts carry ``info`` under ``COND_KEY``."""
    return [[c, {**d, COND_KEY: info}] for c, d in conditioning]


# --- attention capture -----------------------------------------------------------------------------

class _Shared:
    """ComfyUI deep-copies model options on clone; capture objects are shared instead."""

    def __deepcopy__(self, memo):
        return self


def _compose(positions: torch.Tensor, n: int, patches) -> tuple:
    """Where ``positions`` of an n-column context end up after each patch inserts its tokens in turn."""
    for p in patches:
        start, stop = p.layout.token_span(n)
        positions = p.layout.text_positions(n)[positions]
        n += stop - start
    return positions, n


def _probs_columns(q, k, mask, scale, cols):
    return attention_probs(q, k, scale, mask)[..., cols]


class Capture(_Shared):
    """Records text->image attention maps during the refinement forward (see the module docstring).

    grid: (H, W) of the maps. ``layers`` holds (B, H*W, n_text) per recorded layer; ``recorded``
    counts them over the capture's life (tests check that later sampling records nothing).
    """

    def __init__(self, family: str, grid: tuple, unet_soft=(), register: int = 0, previous=None):
        self.family, self.grid = family, tuple(grid)
        self.unet_soft = tuple(unet_soft)
        self.register, self.previous = register, previous
        self.layers, self.seen, self.n_text = [], set(), set()
        self.armed = None
        self.arms = 0  # layers armed since the last reset (0: the model did not run)
        self.recorded = 0

    def reset(self):
        self.layers, self.seen, self.n_text, self.armed, self.arms = [], set(), set(), None, 0

    def release(self):
        """Drop references to the model's patches once refinement is over (the counters stay)."""
        self.reset()
        self.unet_soft, self.previous = (), None

    # --- arming ----------------------------------------------------------------------------
    def attn2(self, n, context, value, extra_options):
        """UNet attn2_patch (runs after the soft-token patches): arm for this block's cross-attention."""
        group = _GROUP_OF_BLOCK.get((extra_options.get("block") or ("",))[0])
        active = [p for p in self.unet_soft if p.tokens is not None and group in p.layout.blocks]
        n_orig = context.shape[1] - sum(p.layout.n_tokens for p in active)
        cols, key_len = _compose(torch.arange(n_orig), n_orig, active)
        self.armed = (key_len, cols, None)
        self.arms += 1
        return n, context, value

    def arm_joint(self, txt, img, soft):
        active = [p for p in soft if p.tokens is not None]
        n_orig = txt.shape[1]
        cols, n_txt = _compose(torch.arange(n_orig), n_orig, active)
        self.armed = (n_txt + img.shape[1], cols[self.register:], img.shape[1])
        self.arms += 1

    # --- the override ------------------------------------------------------------------------
    def __call__(self, func, *args, **kwargs):
        armed, self.armed = self.armed, None
        target = func if armed is None else functools.partial(self._record_then, func, armed)
        if self.previous is not None:
            return self.previous(target, *args, **kwargs)
        return target(*args, **kwargs)

    def _record_then(self, func, armed, *args, **kwargs):
        self._record(armed, args, kwargs)
        return func(*args, **kwargs)

    def _record(self, armed, args, kwargs):
        key_len, cols, n_img = armed
        q, k = args[0], args[1]
        heads = args[3] if len(args) > 3 else kwargs["heads"]
        mask = kwargs.get("mask", args[4] if len(args) > 4 else None)
        if not kwargs.get("skip_reshape", False):
            b = q.shape[0]
            q = q.view(b, q.shape[1], heads, -1).transpose(1, 2)
            k = k.view(b, k.shape[1], heads, -1).transpose(1, 2)
        if k.shape[-2] != key_len:
            return
        nq = q.shape[-2]
        if n_img is None:  # UNet cross-attention: only the target grid
            self.seen.add(nq)
            if nq != self.grid[0] * self.grid[1]:
                return
        else:  # MMDiT: image-query rows of the joint attention, which come last
            if n_img != self.grid[0] * self.grid[1]:
                raise ValueError(f"the MMDiT has {n_img} image tokens, expected a {self.grid[0]}x{self.grid[1]} grid")
            q = q[:, :, nq - n_img:]
            if mask is not None and mask.ndim >= 2 and mask.shape[-2] == nq:
                mask = mask[..., nq - n_img:, :]
        if mask is not None:
            if mask.ndim == 2:
                mask = mask[None, None]
            elif mask.ndim == 3:
                mask = mask[:, None]
        scale = q.shape[-1] ** -0.5
        cols = cols.to(q.device)
        if torch.is_grad_enabled():  # recompute the (B, heads, Nq, K) logits in backward instead of storing them
            probs = torch.utils.checkpoint.checkpoint(_probs_columns, q, k, mask, scale, cols, use_reentrant=False)
        else:
            probs = _probs_columns(q, k, mask, scale, cols)
        self.layers.append(probs)
        self.n_text.add(len(cols))
        self.recorded += 1

    def maps(self) -> torch.Tensor:
        """The mean over recorded layers, (B, H, W, n_text)."""
        if not self.layers:
            if self.family == UNET:
                sizes = sorted(self.seen, reverse=True)
                raise ValueError(f"no cross-attention layer runs at the {self.grid[0]}x{self.grid[1]} map grid; this "
                                 f"model's cross-attention runs at {sizes} positions for this latent: change "
                                 f"attention_downscale (latent size / downscale must match one of them)")
            raise ValueError("no joint attention was captured")
        A = torch.stack(self.layers).mean(dim=0)
        return A.reshape(A.shape[0], self.grid[0], self.grid[1], A.shape[-1])

    # --- installation --------------------------------------------------------------------------
    @classmethod
    def install(cls, model_options: dict, base_model, family: str, grid: tuple):
        """(capture, model options with the capture) from the sampler's model options (not modified)."""
        mo = comfy.model_patcher.create_model_options_clone(model_options)
        to = mo.setdefault("transformer_options", {})
        dm = base_model.diffusion_model
        if family == UNET:
            patches = to.setdefault("patches", {})
            existing = list(patches.get("attn2_patch", []))
            soft = [p.__self__ for p in existing if isinstance(getattr(p, "__self__", None), SoftTokenPatch)]
            capture = cls(family, grid, unet_soft=soft, previous=to.get(_OVERRIDE_KEY))
            patches["attn2_patch"] = existing + [capture.attn2]
        else:
            replaces = to.setdefault("patches_replace", {}).setdefault("dit", {})
            capture = cls(family, grid, register=int(getattr(dm, "register_length", 0) or 0),
                          previous=to.get(_OVERRIDE_KEY))
            for i in range(len(dm.joint_blocks)):
                previous = replaces.get(("double_block", i))
                replaces[("double_block", i)] = _JointArm(capture, dm, i, previous)
        to[_OVERRIDE_KEY] = capture
        return capture, mo


class _JointArm(_Shared):
    """MMDiT double-block replace: arm the capture, run the previous replace (or the block) unchekpointed."""

    def __init__(self, capture: Capture, dm, index: int, previous=None):
        self.capture, self.dm, self.index, self.previous = capture, dm, index, previous
        soft, r = [], previous
        while isinstance(r, BlockPatch):  # soft-token replaces, outermost (first to insert) first
            soft.append(r.patch)
            r = r.previous
        self.soft = soft

    def _block(self, args):
        # ComfyUI's own block wrapper checkpoints the block; the capture inside must not be recomputed
        txt, img = self.dm.joint_blocks[self.index](args["txt"], args["img"], c=args["vec"], use_checkpoint=False,
                                                    transformer_options=args["transformer_options"])
        return {"txt": txt, "img": img}

    def __call__(self, args, extra):
        self.capture.arm_joint(args["txt"], args["img"], self.soft)
        try:
            if self.previous is not None:
                return self.previous(args, {**extra, "original_block": self._block})
            return self._block(args)
        finally:
            self.capture.armed = None


# --- weights usable by autograd ------------------------------------------------------------------

def _clone_weight(w):
    return w.clone()


@contextlib.contextmanager
def trainable_forward(module):
    """Let backward run through ``module`` whose weights were made under inference mode, then undo.

    ComfyUI ops get a clone function in their weight/bias function lists (the cast path then
    hands a normal tensor to the op); other inference parameters are swapped for normal copies;
    parameters that require grad are frozen. Everything is put back on exit.
    """
    undo = []
    try:
        with torch.inference_mode(False):
            for m in module.modules():
                for name, p in list(m._parameters.items()):
                    if p is None:
                        continue
                    if p.is_inference():
                        fname = f"{name}_function"
                        if name in ("weight", "bias") and isinstance(getattr(m, fname, None), list):
                            had = fname in m.__dict__
                            old = m.__dict__.get(fname)
                            setattr(m, fname, list(getattr(m, fname)) + [_clone_weight])
                            undo.append(("fn", m, fname, had, old))
                        else:
                            m._parameters[name] = torch.nn.Parameter(p.clone(), requires_grad=False)
                            undo.append(("param", m, name, p, None))
                    elif p.requires_grad:
                        p.requires_grad_(False)
                        undo.append(("grad", p, None, None, None))
        yield
    finally:
        for kind, a, b, c, d in reversed(undo):
            if kind == "fn":
                if c:
                    setattr(a, b, d)
                else:
                    delattr(a, b)
            elif kind == "param":
                a._parameters[b] = c
            else:
                a.requires_grad_(True)


# --- the sampler ------------------------------------------------------------------------------------

def model_family(base_model) -> str:
    """UNET (SD1.x/SD2/SDXL: epsilon or v) or MMDIT (SD3); ValueError for other models."""
    dm = base_model.diffusion_model
    ms = base_model.model_sampling
    name = f"{type(base_model).__name__} ({type(dm).__name__})"
    if hasattr(dm, "joint_blocks") and isinstance(ms, comfy.model_sampling.CONST):
        return MMDIT
    if hasattr(dm, "input_blocks") and hasattr(dm, "middle_block") and isinstance(ms, comfy.model_sampling.EPS) \
            and not isinstance(ms, comfy.model_sampling.CONST):
        return UNET
    raise ValueError(f"Step-Selected Refinement supports SD1.x/SD2/SDXL UNets and SD3 MMDiT models; {name} is "
                     f"not supported")


@dataclass
class _Plan:
    step: int
    n_steps: int
    sigma: float
    alpha: float
    family: str
    entries: list


class _RefiningModel:
    """Stands in for the sampler's model: refines the state once, then always delegates."""

    def __init__(self, wrapped, owner, plan: _Plan):
        self._wrapped, self._owner, self._plan, self._done = wrapped, owner, plan, False

    def __getattr__(self, name):
        return getattr(self._wrapped, name)

    def __call__(self, x, sigma, *args, **kwargs):
        if not self._done and float(torch.as_tensor(sigma).max()) <= self._plan.sigma * (1 + SIGMA_TOLERANCE):
            self._done = True
            self._owner._refine(self._wrapped, x, torch.as_tensor(sigma, device=x.device), kwargs.get("model_options", {}),
                                self._plan)
        return self._wrapped(x, sigma, *args, **kwargs)


class RefinementSampler(comfy.samplers.Sampler):
    """A SAMPLER that pauses once at the chosen step and refines the latent (IterRef), then goes on.

    refine_at: fraction of the schedule (step = round(refine_at * steps)); < 0 uses the model
    family's default (DEFAULT_REFINE_AT). refine_step >= 0 overrides it with a step index.
    downscale: UNet attention maps at latent / downscale (SD3 always uses its patch grid).
    ``last_run`` keeps the latest refinement's step, losses and latents (before/after).

    The state refined is the tensor of the first model call at or below the step's sigma. For
    samplers that evaluate the model once per step (euler, euler_ancestral, dpmpp_2m, lms, ddpm,
    uni_pc, ...) and those whose extra evaluations lie between two noise levels (dpm_2,
    dpmpp_2s_ancestral, dpmpp_sde) that is the sampler's state at the step. Samplers whose
    corrector evaluates at the *next* level (heun, heunpp2, sa_solver_pece) would hand over the
    previous step's predictor instead, so they are refused.
    """

    def __init__(self, sampler, settings: RefineSettings, refine_at: float = -1.0, refine_step: int = -1,
                 downscale: int = DEFAULT_DOWNSCALE):
        if not hasattr(sampler, "sample"):
            raise ValueError("sampler must be a ComfyUI SAMPLER")
        if refine_at > 1:
            raise ValueError(f"refine_at is a fraction of the schedule in [0, 1] (or -1 for the default), got {refine_at}")
        if int(downscale) < 1:
            raise ValueError(f"attention_downscale must be >= 1, got {downscale}")
        self.sampler, self.settings = sampler, settings
        self.refine_at, self.refine_step, self.downscale = float(refine_at), int(refine_step), int(downscale)
        self.last_run = None

    def max_denoise(self, model_wrap, sigmas):
        return self.sampler.max_denoise(model_wrap, sigmas)

    def plan(self, model_wrap, sigmas, denoise_mask=None) -> _Plan:
        """Check everything that can be checked before sampling; ValueError with the reason."""
        family = model_family(model_wrap.inner_model)
        function = getattr(getattr(self.sampler, "sampler_function", None), "__name__", "")
        if function in NEXT_LEVEL_CORRECTORS:
            raise ValueError(f"Step-Selected Refinement cannot wrap {function.removeprefix('sample_')}: its corrector "
                             f"evaluates the next noise level inside the previous step, so the refinement would not "
                             f"reach the sampler's state; use e.g. euler, euler_ancestral, dpmpp_2m or dpm_2")
        if denoise_mask is not None:
            raise ValueError("Step-Selected Refinement does not support inpainting (a noise mask on the latent, e.g. "
                             "Set Latent Noise Mask / VAE Encode for Inpainting); sample without the mask")
        conds = getattr(model_wrap, "conds", None) or {}
        entries = [c for c in conds.get("positive", []) if COND_KEY in c]
        if not entries:
            raise ValueError("the positive conditioning has no refinement subjects: encode the prompt with "
                             "\"CLIP Text Encode (Refinement Subjects)\"")
        for c in entries:
            if c[COND_KEY].family != family:
                raise ValueError(f"the subjects were encoded with a {c[COND_KEY].family.upper()} text encoder, but the "
                                 f"model is a {family.upper()} model")
        n_steps = len(sigmas) - 1
        if self.refine_step >= 0:
            step, what = self.refine_step, f"refine_step {self.refine_step}"
        else:
            frac = self.refine_at if self.refine_at >= 0 else DEFAULT_REFINE_AT[family]
            step, what = int(round(frac * n_steps)), f"refine_at {frac:g} (step {int(round(frac * n_steps))})"
        if not 0 <= step < n_steps or float(sigmas[step]) <= 0:
            raise ValueError(f"{what} is outside the schedule: the sampler gets {max(n_steps, 0)} steps, refinement "
                             f"needs a step in 0..{n_steps - 1} with sigma > 0")
        alpha = step_size(step, n_steps, self.settings.scale, tuple(self.settings.scale_range))
        return _Plan(step, n_steps, float(sigmas[step]), alpha, family, entries)

    def sample(self, model_wrap, sigmas, extra_args, callback, noise, latent_image=None, denoise_mask=None,
               disable_pbar=False):
        plan = self.plan(model_wrap, sigmas, denoise_mask)
        proxy = _RefiningModel(model_wrap, self, plan)
        out = self.sampler.sample(proxy, sigmas, extra_args, callback, noise, latent_image, denoise_mask, disable_pbar)
        if not proxy._done:
            logger.warning("Step-Selected Refinement: the sampler never evaluated the model at step %d (sigma %.4g); "
                           "nothing was refined", plan.step, plan.sigma)
        return out

    # --- the refinement itself -----------------------------------------------------------------
    def _grid(self, base_model, family, shape):
        h, w = shape[-2], shape[-1]
        f = int(base_model.diffusion_model.patch_size) if family == MMDIT else self.downscale
        return (math.ceil(h / f), math.ceil(w / f))

    def _refine(self, model_wrap, x, sigma, model_options, plan: _Plan):
        s = self.settings
        run = {"step": plan.step, "sigma": plan.sigma, "alpha": plan.alpha, "history": [], "capture": None}
        self.last_run = run
        if s.iterations == 0:
            return
        base = model_wrap.inner_model
        batch = x.shape[0]
        with torch.inference_mode(False):
            x0 = x.detach().clone()
            sig = sigma.detach().clone()
            scale = base.model_sampling.calculate_input(sig, torch.ones_like(x0))
            capture, mo = Capture.install(model_options, base, plan.family, self._grid(base, plan.family, x0.shape))
            run["capture"] = capture
            bar = comfy.utils.ProgressBar(s.iterations)

            def loss_fn(native):
                comfy.model_management.throw_exception_if_processing_interrupted()
                results = []
                for entry in plan.entries:
                    info = entry[COND_KEY]
                    capture.reset()
                    comfy.samplers.calc_cond_batch(base, [[entry]], native / scale, sig, mo)
                    if capture.arms == 0:
                        continue  # this entry does not run at this step (timestep range)
                    A = capture.maps()
                    if A.shape[-1] != info.n_text:
                        raise ValueError(f"captured {A.shape[-1]} text columns but the prompt has {info.n_text}: the "
                                         f"conditioning was changed after encoding (concatenated or another text "
                                         f"encoder); refinement needs the prompt as encoded")
                    results.append(batch_loss(A, [list(info.streams)] * batch, s.loss, s.smoothing))
                capture.reset()
                bar.update(1)
                if not results:
                    raise ValueError("no positive conditioning with subjects is active at the refinement step")
                return {k: torch.stack([r[k] for r in results]).mean(dim=0) for k in results[0]}

            try:
                with trainable_forward(base.diffusion_model):
                    refined, history = refine_latent(x0 * scale, loss_fn, plan.alpha, s.iterations, s.threshold)
            except RuntimeError as e:
                if "nference tensor" in str(e):
                    raise ValueError(f"refinement could not backpropagate through a part of the model made under "
                                     f"inference mode (e.g. a ControlNet or another pack's patch): {e}") from e
                raise
            finally:
                capture.release()
            new = (refined / scale).to(x.dtype)
        run.update(history=history, x_before=x0, x_after=new.detach().clone())
        if history:
            first, last = history[0]["loss"], history[-1]["loss"]
            logger.info("Step-Selected Refinement at step %d/%d (sigma %.4g): loss %s -> %s over %d iterations",
                        plan.step, plan.n_steps, plan.sigma, [round(v, 4) for v in first],
                        [round(v, 4) for v in last], len(history))
        with (torch.inference_mode() if x.is_inference() else torch.no_grad()):
            x.copy_(new)
