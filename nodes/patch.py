"""Patching ComfyUI MODEL objects with soft tokens.

The patch always goes on a *clone* of the ModelPatcher; the input model is never mutated.
Token semantics (which layers, where tokens go, time buckets) come from training/layouts.py
and training/tokens.py, the same code the diffusers backend uses.

- UNet (SD1.5, SDXL): an ``attn2_patch`` inserts the tokens after BOS into the context (and
  value) of every cross-attention layer in the layout's block groups.
- MMDiT (SD3): a ``dit``/``double_block`` replace prepends (or appends) the tokens to the text
  stream, runs the original block (or the replace another pack installed before us), and
  strips them again; the last, ``pre_only`` block returns no text stream.
- Flux.1 (dev, schnell): the same ``double_block`` replace on the double-stream blocks; the
  rotary table ``pe`` (and an attention mask, if any) gets rows for the inserted tokens, the
  rows of a text position (``TokenLayout.rope_rows``); the timestep is 1000 sigma.
- The timestep comes from sigma through the model's own ``model_sampling``, read at call time
  (so model-sampling nodes before or after Load Soft Tokens are both respected).

Strength. 1 is the official behaviour. 0 installs nothing, so the output is bit-identical to
the unpatched model. In between (and above 1) the soft tokens are inserted as usual and the
attention logits of their keys get log(strength) added: every query gives the soft tokens
``strength`` times the attention mass it would give them at strength 1, relative to the text
tokens. This is continuous in strength, tends to "no tokens" as strength -> 0, and costs no
extra denoiser pass. "Cond only" uses the same mechanism with -inf for the uncond rows of a
batched CFG call, which removes the tokens from those rows exactly.
"""

from __future__ import annotations

import contextlib
import copy
import math

import torch

from ..training.layouts import FLUX, MMDIT, UNET
from ..training.tokens import SoftTokens, check_finite

APPLY_TO = ("both", "cond_only")
_GROUP_OF_BLOCK = {"input": "down", "middle": "mid", "output": "up"}
_OVERRIDE_KEY = "optimized_attention_override"


class _Shared:
    """Mixin: ComfyUI deep-copies model_options on clone(); our patch objects are shared instead."""

    def __deepcopy__(self, memo):
        return self


def model_facts(model) -> dict:
    """Family and text-stream widths of a ComfyUI ModelPatcher's denoiser (for layout checks)."""
    dm = model.model.diffusion_model
    if hasattr(dm, "double_blocks") and hasattr(dm, "txt_in"):  # Flux.1 dev / schnell
        return {"family": MMDIT, "text_width": int(dm.hidden_size), "n_blocks": len(dm.double_blocks),
                "embed_width": int(dm.txt_in.in_features), "name": type(model.model).__name__, "arch": FLUX}
    if hasattr(dm, "joint_blocks"):
        embed = getattr(dm, "context_embedder", None)
        return {"family": MMDIT, "text_width": int(dm.hidden_size), "n_blocks": len(dm.joint_blocks),
                "embed_width": getattr(embed, "in_features", None), "name": type(model.model).__name__,
                "arch": "sd35" if _has_qk_norm(dm) else "sd3"}
    if hasattr(dm, "input_blocks") and hasattr(dm, "middle_block"):
        ctx = model.model.model_config.unet_config.get("context_dim")
        return {"family": UNET, "text_width": int(ctx), "name": type(model.model).__name__}
    raise ValueError(f"soft tokens support SD1.5/SDXL UNets, SD3 MMDiT and Flux.1 models; "
                     f"{type(model.model).__name__} ({type(dm).__name__}) is not supported yet")


def needs_pooled(model) -> bool:
    """True when the denoiser takes a pooled text vector: an ADM input (SDXL, SD3) or Flux.1's vector_in
    (ComfyUI gives Flux adm_channels 0, but its encode_adm reads the pooled output)."""
    return bool(getattr(model.model, "adm_channels", 0)) or model_facts(model).get("arch") == FLUX


def _has_qk_norm(dm) -> bool:
    """True for SD3.5 (Medium and Large): its joint blocks RMS-normalise q and k; SD3 has none."""
    ln_q = getattr(dm.joint_blocks[0].context_block.attn, "ln_q", None)
    return ln_q is not None and not isinstance(ln_q, torch.nn.Identity)


class SoftTokenPatch(_Shared):
    """Per-model state of one soft-token patch: tokens on the right device, timestep, bias."""

    def __init__(self, tokens: SoftTokens, base_model, strength: float, apply_to: str,
                 project=None, set_index: int = 0):
        self.tokens, self.layout = tokens, tokens.layout
        self.base_model, self.project, self.set_index = base_model, project, set_index
        self.strength, self.apply_to = float(strength), apply_to
        self.needs_bias = self.strength != 1.0 or apply_to != "both"
        self.pending = None  # (start, stop, expected key length, row bias) for the next attention
        self._device_tokens = {}
        self._cache_sigmas, self._cache = None, {}

    @contextlib.contextmanager
    def using(self, tokens: SoftTokens | None, set_index=0):
        """Use other tokens of the same layout (None: pass-through) for the calls inside (training)."""
        if tokens is not None and tokens.layout != self.layout:
            raise ValueError(f"tokens ({tokens.layout.describe()}) do not match the installed layout "
                             f"({self.layout.describe()})")
        old = self.snapshot()
        self.tokens, self.set_index = tokens, set_index
        self._cache_sigmas, self._cache = None, {}
        try:
            yield
        finally:
            self.restore(old)

    def snapshot(self) -> tuple:
        """The state the hooks read (tokens, set index, token cache), e.g. for checkpoint recompute."""
        return self.tokens, self.set_index, self._cache_sigmas, dict(self._cache)

    def restore(self, state: tuple) -> None:
        """Put back a ``snapshot()``."""
        self.tokens, self.set_index, self._cache_sigmas, cache = state
        self._cache = dict(cache)

    def _tokens_on(self, device) -> SoftTokens:
        if self.tokens.static.device == device:
            return self.tokens
        if device not in self._device_tokens:  # inference copy; training keeps tokens on device
            self._device_tokens[device] = copy.deepcopy(self.tokens).requires_grad_(False).to(device)
        return self._device_tokens[device]

    def layer_tokens(self, layer: int, transformer_options: dict, batch: int, like: torch.Tensor):
        """Tokens (batch, m, width) for the current step, cached across the layers of one call."""
        sigmas = transformer_options["sigmas"]
        if self._cache_sigmas is not sigmas:  # a new denoiser call
            self._cache_sigmas, self._cache = sigmas, {}
        key = (layer, batch, like.device, like.dtype)
        if key not in self._cache:
            # Read at call time: a model-sampling node placed after this one object-patches the
            # shared BaseModel while its clone samples, and the timestep must follow it.
            t = self.base_model.model_sampling.timestep(sigmas).reshape(-1).float() * self.layout.timestep_scale
            if t.numel() != batch:
                t = t.expand(batch) if t.numel() == 1 else t.repeat_interleave(batch // t.numel())
            tokens = self._tokens_on(like.device).layer_tokens(layer, t, self.set_index, self.project)
            self._cache[key] = tokens.to(like.dtype).expand(batch, -1, -1)
        return self._cache[key]

    def row_bias(self, transformer_options: dict, batch: int, device, dtype) -> torch.Tensor:
        """Per-row additive logit bias for the soft-token keys: log(strength), -inf where excluded."""
        value = math.log(self.strength) if self.strength > 0 else -math.inf
        bias = torch.full((batch,), value, device=device, dtype=dtype)
        if self.apply_to == "cond_only":
            chunks = transformer_options.get("cond_or_uncond") or [0]
            per = batch // len(chunks)
            for i, kind in enumerate(chunks):
                if kind == 1:  # 1 = uncond chunk of a batched CFG call
                    bias[i * per:(i + 1) * per] = -math.inf
        return bias

    def arm(self, transformer_options: dict, n_text: int, key_len: int, batch: int, like):
        """Remember the bias for the next attention call (consumed by AttentionBias)."""
        if self.needs_bias:
            start, stop = self.layout.token_span(n_text)
            self.pending = (start, stop, key_len, self.row_bias(transformer_options, batch, like.device, like.dtype))

    # --- UNet ---------------------------------------------------------------------------
    def attn2(self, n, context, value, extra_options):
        group = _GROUP_OF_BLOCK.get((extra_options.get("block") or ("",))[0])
        if self.tokens is None or group not in self.layout.blocks:
            return n, context, value
        tokens = self.layer_tokens(0, extra_options, context.shape[0], context)
        new_context = self.layout.insert(context, tokens)
        new_value = new_context if value is context else self.layout.insert(value, tokens)
        self.arm(extra_options, context.shape[1], new_context.shape[1], context.shape[0], context)
        return n, new_context, new_value


class BlockPatch(_Shared):
    """MMDiT double-block replace: insert, run the block (or a previous replace), strip."""

    def __init__(self, patch: SoftTokenPatch, layer: int, previous=None):
        self.patch, self.layer, self.previous = patch, layer, previous

    def __call__(self, args, extra):
        p = self.patch
        if p.tokens is None:  # switched off for this call (training's plain-model passes)
            return self.previous(args, extra) if self.previous is not None else extra["original_block"](args)
        txt, img = args["txt"], args["img"]
        to = args["transformer_options"]
        tokens = p.layer_tokens(self.layer, to, txt.shape[0], txt)
        new_txt = p.layout.insert(txt, tokens)
        p.arm(to, txt.shape[1], new_txt.shape[1] + img.shape[1], txt.shape[0], txt)
        new_args = dict(args, txt=new_txt)
        if p.layout.arch == FLUX:  # rotary rows (text first, then image) and mask for the tokens
            n = txt.shape[1]
            if args.get("pe") is not None:
                new_args["pe"] = p.layout.rope_rows(args["pe"], n, dim=2)
            if args.get("attn_mask") is not None:
                new_args["attn_mask"] = _extend_mask(p.layout, args["attn_mask"], n, n + img.shape[1])
        try:
            if self.previous is not None:
                out = self.previous(new_args, extra)
            else:
                out = extra["original_block"](new_args)
        finally:
            p.pending = None
        out = dict(out)
        if out.get("txt") is not None:  # the last (pre_only) block returns no text stream
            out["txt"] = p.layout.strip(out["txt"])
        return out


class AttentionBias(_Shared):
    """Attention override that adds the armed soft-token bias to the next matching call.

    Chains to an override another pack installed before us.
    """

    def __init__(self, patch: SoftTokenPatch, previous=None):
        self.patch, self.previous = patch, previous

    def __call__(self, func, *args, **kwargs):
        pending = self.patch.pending
        if pending is not None:
            start, stop, key_len, bias = pending
            k = args[1] if len(args) > 1 else kwargs["k"]
            n_keys = k.shape[2] if kwargs.get("skip_reshape") else k.shape[1]
            if n_keys == key_len:
                self.patch.pending = None
                extra = torch.zeros(bias.shape[0], 1, 1, n_keys, device=k.device, dtype=k.dtype)
                extra[:, 0, 0, start:stop] = bias.to(k.dtype)[:, None]
                mask = kwargs.get("mask")
                if mask is None and len(args) > 4:
                    args, mask = args[:4], args[4]
                kwargs["mask"] = extra if mask is None else _as_float_4d(mask, k.dtype) + extra
        if self.previous is not None:
            return self.previous(func, *args, **kwargs)
        return func(*args, **kwargs)


def _extend_mask(layout, mask, n_text, n_total):
    """An attention mask over (text, image) with the soft-token rows/columns added: they attend
    and are attended like the text (the mask row/column of the text position next to them)."""
    for dim in (-1, -2):
        if mask.ndim >= -dim and mask.shape[dim] == n_total:
            mask = layout.rope_rows(mask, n_text, dim=mask.ndim + dim)
    return mask


def _as_float_4d(mask, dtype):
    if mask.dtype == torch.bool:
        mask = torch.zeros(mask.shape, dtype=dtype, device=mask.device).masked_fill(~mask, -math.inf)
    while mask.ndim < 4:
        mask = mask.unsqueeze(-3)
    return mask.to(dtype)


def _existing_soft_patches(model) -> list:
    to = model.model_options.get("transformer_options", {})
    found = [p.__self__ for p in to.get("patches", {}).get("attn2_patch", [])
             if isinstance(getattr(p, "__self__", None), SoftTokenPatch)]
    found += [b.patch for b in to.get("patches_replace", {}).get("dit", {}).values() if isinstance(b, BlockPatch)]
    return found


def apply_soft_tokens(model, tokens: SoftTokens, strength: float = 1.0, apply_to: str = "both",
                      name: str = "soft tokens"):
    """A patched clone of a ComfyUI MODEL with the tokens inserted. The input is not changed.

    Raises ValueError (naming the file and the model) when the tokens do not fit the model.
    """
    if apply_to not in APPLY_TO:
        raise ValueError(f"apply_to must be one of {APPLY_TO}, got {apply_to!r}")
    if not (strength >= 0 and math.isfinite(strength)):
        raise ValueError(f"strength must be a finite number >= 0, got {strength}")
    check_fits(model, tokens, name)
    m = model.clone()
    if strength == 0:
        return m  # no insertion at all: bit-identical to the unpatched model
    install_soft_tokens(m, tokens, strength, apply_to)
    return m


def check_fits(model, tokens: SoftTokens, name: str = "soft tokens") -> dict:
    """Raise ValueError naming both sides when the tokens do not fit the model (or are not finite);
    returns model_facts."""
    check_finite(tokens, name)
    facts = model_facts(model)
    tokens.layout.check_model(facts["family"], facts["text_width"], facts.get("n_blocks"),
                              facts.get("embed_width"), name=name, model_arch=facts.get("arch"))
    return facts


def install_soft_tokens(m, tokens: SoftTokens, strength: float = 1.0, apply_to: str = "both") -> SoftTokenPatch:
    """Install the soft-token patch on the ModelPatcher ``m`` itself (callers pass a clone)."""
    existing = _existing_soft_patches(m)
    needs_bias = strength != 1.0 or apply_to != "both"
    if existing and (needs_bias or any(p.needs_bias for p in existing)):
        raise ValueError("this model already carries soft tokens; stacking two soft-token sets is "
                         "only supported at strength 1 on both branches")
    dm = m.model.diffusion_model
    project = (dm.txt_in if tokens.layout.arch == FLUX else dm.context_embedder) if tokens.layout.projected else None
    patch = SoftTokenPatch(tokens, m.model, strength, apply_to, project)
    if tokens.layout.family == UNET:
        m.set_model_attn2_patch(patch.attn2)
    else:
        replaces = m.model_options.get("transformer_options", {}).get("patches_replace", {}).get("dit", {})
        for layer, idx in enumerate(tokens.layout.blocks):
            previous = replaces.get(("double_block", idx))
            m.set_model_patch_replace(BlockPatch(patch, layer, previous), "dit", "double_block", idx)
    if needs_bias:
        to = m.model_options.setdefault("transformer_options", {})
        to[_OVERRIDE_KEY] = AttentionBias(patch, to.get(_OVERRIDE_KEY))
    return patch


def has_soft_tokens(model) -> bool:
    """True when the ModelPatcher already carries a soft-token patch."""
    return bool(_existing_soft_patches(model))
