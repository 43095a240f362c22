"""The ComfyUI backend: the engine's Backend protocol (training/backend.py) on a ComfyUI MODEL.

- The forward process, the native target and the timestep come from the model's own
  ``model_sampling``: epsilon and v-prediction models (SD1.5, SD2, SDXL; discrete schedule,
  ``sigma = model_sampling.sigma(t)``) and flow models (SD3; ``sigma = t / 1000`` as in the
  official training, ALGORITHMS pitfall 5, so the denoiser sees the integer t).
- z_t is ComfyUI's own noisy latent (``noise_scaling``); the denoiser runs through
  ``BaseModel.apply_model`` with the conditioning built by the model's ``extra_conds`` (as a
  sampler does); on the training clone, ``model_sampling.calculate_denoised`` is object-patched
  to return the raw output, so predictions are the native epsilon, v or flow velocity (pair
  errors in the same units as the diffusers backend's, also at sigma = 0).
- Tokens go in through ``nodes/patch.py`` (the inference patch, over training/layouts.py),
  switched per call with ``SoftTokenPatch.using``.
- The caller's MODEL is never changed: training runs on a clone. Loader nodes create weights
  under ``torch.inference_mode()``; a weight wrapper returns a normal-tensor clone of every
  such weight so that backward works (as core's Train LoRA does). Gradient checkpointing wraps
  the top-level blocks' forward while training and restores them afterwards. Attention runs
  through PyTorch's SDPA while training (``_sdpa_attention``).
"""

from __future__ import annotations

import contextlib
import copy

import torch
import torch.utils.checkpoint

import comfy.ldm.modules.attention
import comfy.model_management
import comfy.model_sampling

from ..training.layouts import MMDIT
from .patch import has_soft_tokens, install_soft_tokens, model_facts, needs_pooled

PREDICTIONS = ("epsilon", "v", "flow")


def prediction_of(model_sampling) -> str:
    """'epsilon', 'v' or 'flow' for a ComfyUI model_sampling object; ValueError for others."""
    ms = comfy.model_sampling
    unsupported = tuple(c for c in (getattr(ms, n, None) for n in ("EDM", "X0", "COSMOS_RFLOW", "IMG_TO_IMG")) if c)
    if isinstance(model_sampling, unsupported):
        raise ValueError(f"soft-token training supports epsilon, v-prediction and flow models; this model's "
                         f"sampling is {type(model_sampling).__name__}")
    if isinstance(model_sampling, ms.CONST):
        return "flow"
    if isinstance(model_sampling, ms.V_PREDICTION):
        return "v"
    if isinstance(model_sampling, ms.EPS):
        return "epsilon"
    raise ValueError(f"unsupported model sampling {type(model_sampling).__name__}")


def model_arch(model) -> str:
    """'sd15', 'sd2', 'sdxl', 'sd3' or 'sd35': the layout preset for a ComfyUI MODEL (from its class
    and widths). SDXL derivatives (Pony, Illustrious, NoobAI; also v-prediction ones) are 'sdxl';
    SD2.x (512 epsilon or 768 v) is the UNet with 1024-wide context; SD3.5 the MMDiT with qk-norm."""
    facts = model_facts(model)
    if facts["family"] == MMDIT:
        return facts.get("arch", "sd3")
    if getattr(model.model, "adm_channels", 0):
        return "sdxl"
    return "sd2" if facts["text_width"] == 1024 else "sd15"


class _CloneWeight(torch.nn.Module):
    """Weight wrapper: a normal-tensor copy of an inference-mode weight (backward can save it)."""

    def forward(self, w):
        return w.clone()


class ComfyBackend:
    """Backend for a ComfyUI ModelPatcher (SD1.5/SD2/SDXL UNets, SD3 MMDiT).

    Args:
        model: the MODEL (ModelPatcher). It is cloned; the input stays unchanged.
        tokens: any SoftTokens of the layout to train (fixes where the patch goes).
        gradient_checkpointing: recompute the frozen backbone's block activations in backward.
        autocast_dtype: None, or torch.bfloat16 to run the backbone under autocast.

    Use it inside ``with backend.session():`` (loads the clone through ComfyUI's model
    management on its device, outside inference mode; unloads it afterwards).
    Cond keys: "context" (P, n, d) and, for SDXL/SD3/Flux.1, "pooled" (P, p).
    """

    def __init__(self, model, tokens, gradient_checkpointing: bool = False, autocast_dtype=None):
        if has_soft_tokens(model):
            raise ValueError("this MODEL already carries soft tokens (Load/Apply Soft Tokens before the trainer); "
                             "connect the model without them")
        model_facts(model)  # unsupported families fail here
        self.base_model = model
        self.needs_pooled = needs_pooled(model)
        self.prediction = prediction_of(model.get_model_object("model_sampling"))
        self.patcher = model.clone()
        self.patch = install_soft_tokens(self.patcher, tokens)
        to = self.patcher.model_options.setdefault("transformer_options", {})
        if "optimized_attention_override" not in to:  # another pack's choice of attention is respected
            to["optimized_attention_override"] = _sdpa_attention
        self.gradient_checkpointing = gradient_checkpointing
        self.autocast_dtype = autocast_dtype
        self.device = self.patcher.load_device
        self._wrapped, self._guarded = [], []
        self._add_clone_wrappers()
        # apply_model returns the denoised latent; for training we need the raw native output
        # (epsilon, v or velocity), also at sigma = 0 where it cannot be recovered from x0.
        raw = copy.copy(model.get_model_object("model_sampling"))
        raw.calculate_denoised = _raw_output
        self.patcher.add_object_patch("model_sampling", raw)

    @property
    def model_sampling(self):
        return self.patcher.get_model_object("model_sampling")

    @property
    def model(self):
        return self.patcher.model

    @property
    def compute_dtype(self) -> torch.dtype:
        """The dtype the denoiser computes in: the autocast dtype, else what ComfyUI's apply_model
        casts to (the manual-cast dtype, else the weights')."""
        return self.autocast_dtype or self.model.manual_cast_dtype or self.model.get_dtype()

    def _add_clone_wrappers(self):
        for name, module in self.patcher.model.named_modules():
            for kind in ("weight", "bias"):
                p = getattr(module, kind, None)
                if hasattr(module, f"{kind}_function") and isinstance(p, torch.Tensor) and p.is_inference():
                    self.patcher.add_weight_wrapper(f"{name}.{kind}", _CloneWeight())

    def _guard_inplace_blocks(self):
        """Flux's blocks update their stream input in place (``x += ...``) after a norm saved it for
        backward, which autograd refuses. While training, a saved tensor that shares storage with a
        block's stream input is saved as a copy (only those: the rest is saved as usual)."""
        dm = self.model.diffusion_model
        if not hasattr(dm, "double_blocks"):
            return
        for block in list(dm.double_blocks) + list(dm.single_blocks):
            original = block.forward

            def forward(*args, _f=original, **kwargs):
                if not torch.is_grad_enabled():
                    return _f(*args, **kwargs)
                streams = [kwargs.get(k) for k in ("img", "txt", "x")] + list(args[:1])
                ptrs = {t.untyped_storage().data_ptr() for t in streams if isinstance(t, torch.Tensor)}

                def pack(t):
                    return t.clone() if t.untyped_storage().data_ptr() in ptrs else t

                with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
                    return _f(*args, **kwargs)

            block.forward = forward
            self._guarded.append(block)

    def _patch_plain_parameters(self):
        """Inference-mode parameters that no weight wrapper covers (e.g. Flux's RMSNorm ``scale``,
        read directly rather than through a cast op) get a normal-tensor copy as an object patch
        of the training clone (applied on load, removed on unload; the shared model is untouched)."""
        for name, module in self.patcher.model.named_modules():
            for kind, p in module.named_parameters(recurse=False):
                covered = kind in ("weight", "bias") and hasattr(module, f"{kind}_function")
                key = f"{name}.{kind}" if name else kind
                if p.is_inference() and not covered and key not in self.patcher.object_patches:
                    self.patcher.add_object_patch(key, torch.nn.Parameter(p.detach().clone(), requires_grad=False))

    @contextlib.contextmanager
    def session(self):
        """Load the clone for training (inference mode off, optional checkpointing); clean up after."""
        with torch.inference_mode(False):
            self.patcher.model.requires_grad_(False)
            # Another patcher of this model (e.g. a sampler's) may still be loaded with its weights in
            # place; ComfyUI would then reuse that state and skip installing our weight wrappers.
            self._unload(lambda p: p.is_clone(self.patcher))
            self._patch_plain_parameters()
            comfy.model_management.load_models_gpu([self.patcher], force_full_load=True)
            self.device = self.patcher.load_device
            self._guard_inplace_blocks()
            if self.gradient_checkpointing:
                self._wrap_blocks()
            try:
                yield self
            finally:
                self._unwrap_blocks()
                for block in self._guarded:
                    block.__dict__.pop("forward", None)
                self._guarded = []
                self._unload(lambda p: p is self.patcher)

    @staticmethod
    def _unload(which):
        """Unload loaded models ``which(patcher)`` selects through model management (weights,
        wrappers and object patches leave the shared model; memory is freed)."""
        mm = comfy.model_management
        for i in reversed(range(len(mm.current_loaded_models))):
            if which(mm.current_loaded_models[i].model):
                mm.current_loaded_models.pop(i).model_unload()
        mm.soft_empty_cache()

    # --- forward process -----------------------------------------------------------------
    def sigma(self, t: torch.Tensor) -> torch.Tensor:
        """sigma of integer timesteps t (N,) in the model's own parametrisation, fp32."""
        t = torch.as_tensor(t).reshape(-1).float()
        if self.prediction == "flow":
            return t / 1000.0
        ms = self.model_sampling
        return ms.sigma(t.to(ms.sigmas.device)).float()

    def noisy(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """ComfyUI's noisy latent: x0 + sigma noise (epsilon, v) or (1 - sigma) x0 + sigma noise (flow)."""
        s = self.sigma(t).to(x0.device, x0.dtype)
        return self.model_sampling.noise_scaling(s, noise.expand_as(x0), x0)

    def target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The native target: noise (epsilon), v = (noise - sigma x0) / sqrt(1 + sigma^2), noise - x0 (flow)."""
        noise = noise.expand_as(x0)
        if self.prediction == "epsilon":
            return noise
        if self.prediction == "flow":
            return noise - x0
        s = _bcast(self.sigma(t).to(x0.device, x0.dtype), x0)
        return (noise - s * x0) / (1 + s * s).sqrt()

    # --- prediction ----------------------------------------------------------------------
    def predict(self, z_t: torch.Tensor, t: torch.Tensor, cond: dict, tokens=None, set_index=0) -> torch.Tensor:
        """The denoiser's native prediction (N, C, h, w) in fp32; tokens None runs the plain model."""
        n = z_t.shape[0]
        t = torch.as_tensor(t).reshape(-1)
        t = t.expand(n) if t.numel() == 1 else t
        if t.shape[0] != n:
            raise ValueError(f"t has {t.shape[0]} entries for a batch of {n}")
        x = _plain(z_t).to(self.device)
        sigma = self.sigma(t).to(self.device)
        kwargs = self._conds(x, cond)
        to = dict(self.patcher.model_options.get("transformer_options", {}))
        to.update(sigmas=sigma, cond_or_uncond=[0])
        autocast = (torch.autocast(self.device.type, dtype=self.autocast_dtype) if self.autocast_dtype
                    else contextlib.nullcontext())
        with self.patch.using(tokens, set_index), autocast:
            return self.model.apply_model(x, sigma, transformer_options=to, **kwargs).float()

    def _conds(self, x, cond: dict) -> dict:
        """The denoiser's keyword inputs (c_crossattn, y, ...) through the model's extra_conds."""
        if "context" not in cond:
            raise ValueError(f"conditioning lacks 'context' (has {sorted(cond)})")
        n = x.shape[0]
        bad = {k: v.shape[0] for k, v in cond.items() if v.shape[0] != n}
        if bad:
            raise ValueError(f"conditioning rows {bad} do not match the batch of {n}")
        kw = {"cross_attn": _plain(cond["context"]).to(self.device), "device": self.device, "noise": x,
              "width": x.shape[-1] * 8, "height": x.shape[-2] * 8}
        if "pooled" in cond:
            kw["pooled_output"] = _plain(cond["pooled"]).to(self.device)
        elif self.needs_pooled:
            raise ValueError("this model needs pooled text conditioning ('pooled'); encode the dataset with "
                             "the model's own CLIP")
        out = {}
        for name, c in self.model.extra_conds(**kw).items():
            out[name] = c.process_cond(batch_size=n, device=self.device, area=None).cond
        return out

    # --- gradient checkpointing ------------------------------------------------------------
    def _blocks(self):
        dm = self.model.diffusion_model
        if hasattr(dm, "joint_blocks"):
            return list(dm.joint_blocks)
        if hasattr(dm, "double_blocks"):  # Flux.1
            return list(dm.double_blocks) + list(dm.single_blocks)
        return list(dm.input_blocks) + [dm.middle_block] + list(dm.output_blocks)

    def _wrap_blocks(self):
        patch = self.patch
        for block in self._blocks():
            original = block.forward

            def forward(*args, _f=original, **kwargs):
                if not torch.is_grad_enabled():
                    return _f(*args, **kwargs)
                # The recompute in backward must see this call's tokens; its token cache starts
                # empty so the tokens are recomputed from the parameters inside the block.
                state = patch.snapshot()[:3] + ({},)

                def run(*a, **k):
                    saved = patch.snapshot()
                    patch.restore(state)
                    try:
                        return _f(*a, **k)
                    finally:
                        patch.restore(saved)
                return torch.utils.checkpoint.checkpoint(run, *args, use_reentrant=False, **kwargs)

            block.forward = forward
            self._wrapped.append(block)

    def _unwrap_blocks(self):
        for block in self._wrapped:
            del block.forward  # back to the class's forward
        self._wrapped = []


def _sdpa_attention(func, *args, **kwargs):
    """Training attention: PyTorch's scaled_dot_product_attention, exact like every ComfyUI attention.

    ComfyUI picks its kernel once per process for inference (on a CPU the sub-quadratic one,
    which with autograd was 2x slower and 3x larger than SDPA in bench/comfy_training.py; on
    NVIDIA GPUs SDPA already). Training always uses SDPA.
    """
    return comfy.ldm.modules.attention.attention_pytorch(*args, **kwargs)


def _raw_output(sigma, model_output, model_input):
    return model_output


def _bcast(s: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    return s.reshape(-1, *([1] * (like.ndim - 1)))


def _plain(x: torch.Tensor) -> torch.Tensor:
    """A normal tensor for autograd (tensors made under inference mode are cloned)."""
    return x.clone() if x.is_inference() else x
