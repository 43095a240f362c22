"""Soft-token insertion into diffusers models through forward hooks.

The model's weights and code stay untouched: hooks swap the text stream on the way into the
selected layers (and, for MMDiT, strip it on the way out). All semantics come from the
layout (training/layouts.py) and the SoftTokens module, exactly like the ComfyUI patch.

Supported: ``UNet2DConditionModel`` (SD1.5, SDXL; tokens go into every cross-attention
``attn2`` of the enabled block groups), ``SD3Transformer2DModel`` (tokens go into the
text stream of the selected joint blocks) and ``FluxTransformer2DModel`` (Flux.1: the same on
the double-stream ``transformer_blocks``; the block's ``image_rotary_emb`` (cos, sin), text rows
first, gets rows for the tokens from ``TokenLayout.rope_rows``; the timestep argument is sigma,
so the time table sees t = 1000 sigma).
"""

from __future__ import annotations

import contextlib
import inspect

import torch

from .layouts import FLUX, MMDIT, UNET
from .tokens import SoftTokens

_UNET_GROUPS = {"down": "down_blocks", "mid": "mid_block", "up": "up_blocks"}


def model_family(model) -> str:
    """'unet' or 'mmdit' for a supported diffusers denoiser, else ValueError."""
    name = type(model).__name__
    if hasattr(model, "down_blocks") and hasattr(model, "mid_block"):
        return UNET
    if hasattr(model, "transformer_blocks") and hasattr(model, "context_embedder"):
        return MMDIT
    raise ValueError(f"{name} is not a supported denoiser (UNet2DConditionModel or SD3Transformer2DModel)")


def describe_model(model) -> dict:
    """The facts a layout is checked against: family, text width, blocks, embedder width."""
    family = model_family(model)
    cfg = model.config
    if is_flux(model):
        return {"family": MMDIT, "text_width": int(cfg.num_attention_heads * cfg.attention_head_dim),
                "n_blocks": len(model.transformer_blocks), "embed_width": int(cfg.joint_attention_dim),
                "arch": FLUX}
    if family == UNET:
        width = cfg.cross_attention_dim
        width = width[0] if isinstance(width, (list, tuple)) else width
        sdxl = getattr(cfg, "addition_embed_type", None) == "text_time"
        return {"family": UNET, "text_width": int(width),
                "arch": "sdxl" if sdxl else "sd2" if int(width) == 1024 else "sd15"}
    return {"family": MMDIT, "text_width": int(cfg.num_attention_heads * cfg.attention_head_dim),
            "n_blocks": len(model.transformer_blocks), "embed_width": int(cfg.joint_attention_dim),
            "arch": "sd35" if getattr(cfg, "qk_norm", None) else "sd3"}  # SD3.5 (Medium, Large): qk-norm


def is_flux(model) -> bool:
    """True for a diffusers FluxTransformer2DModel (double- and single-stream blocks)."""
    return hasattr(model, "single_transformer_blocks") and hasattr(model, "transformer_blocks")


class TokenInjector:
    """Inserts SoftTokens into a diffusers denoiser while installed.

    ``with injector.using(tokens, set_index):`` chooses the tokens (None: plain model; any
    SoftTokens of the same layout, e.g. AGSM's EMA copy) and the set index (int or (B,)
    LongTensor, AGSM polarity) for the calls inside. The timestep is read from the model's
    own forward call.
    """

    def __init__(self, model, tokens: SoftTokens):
        info = describe_model(model)
        tokens.layout.check_model(info["family"], info["text_width"], info.get("n_blocks"),
                                  info.get("embed_width"), model_arch=info.get("arch"))
        self.model, self.tokens, self.layout = model, tokens, tokens.layout
        self.enabled = True
        self.set_index = 0
        self._t = None
        self._cache = {}
        self._handles = [model.register_forward_pre_hook(self._on_model_call, with_kwargs=True),
                         model.register_forward_hook(self._after_model_call)]
        self._forward_sig = inspect.signature(model.forward)
        if info["family"] == UNET:
            for group in self.layout.blocks:
                for attn in _unet_cross_attentions(model, group):
                    self._handles.append(attn.register_forward_pre_hook(self._on_attn2, with_kwargs=True))
        else:
            for layer, idx in enumerate(self.layout.blocks):
                block = model.transformer_blocks[idx]
                self._handles.append(block.register_forward_pre_hook(
                    self._make_block_pre(layer), with_kwargs=True))
                self._handles.append(block.register_forward_hook(self._block_post))

    def remove(self):
        """Uninstall every hook; the model is exactly as before."""
        for h in self._handles:
            h.remove()
        self._handles = []

    @contextlib.contextmanager
    def using(self, tokens: SoftTokens | None, set_index=0):
        if tokens is not None and tokens.layout != self.layout:
            raise ValueError(f"tokens ({tokens.layout.describe()}) do not match the installed layout "
                             f"({self.layout.describe()})")
        old = self.tokens, self.enabled, self.set_index
        self.tokens, self.enabled, self.set_index = (tokens or self.tokens), tokens is not None, set_index
        try:
            yield
        finally:
            self.tokens, self.enabled, self.set_index = old

    def snapshot(self) -> tuple:
        """The state the hooks read (tokens, switch, set index, timestep, token cache)."""
        return self.tokens, self.enabled, self.set_index, self._t, dict(self._cache)

    def restore(self, state: tuple) -> None:
        """Put back a ``snapshot()``, e.g. to recompute a checkpointed block during backward."""
        self.tokens, self.enabled, self.set_index, self._t, cache = state
        self._cache = dict(cache)

    @contextlib.contextmanager
    def tokens_set(self, set_index):
        """Use the installed tokens with another set index (AGSM polarity) inside the block."""
        with self.using(self.tokens, set_index):
            yield

    # --- hooks ---------------------------------------------------------------------------
    def _on_model_call(self, module, args, kwargs):
        bound = self._forward_sig.bind_partial(*args, **kwargs).arguments
        sample = bound.get("sample", bound.get("hidden_states"))
        t = torch.as_tensor(bound["timestep"], device=sample.device) * self.layout.timestep_scale
        self._t = t.reshape(-1).expand(sample.shape[0]) if t.numel() == 1 else t.reshape(-1)
        self._cache = {}

    def _after_model_call(self, module, args, output):
        self._cache = {}

    def _layer_tokens(self, layer: int) -> torch.Tensor:
        key = layer
        if key not in self._cache:
            project = self.model.context_embedder if self.layout.projected else None
            self._cache[key] = self.tokens.layer_tokens(layer, self._t, self.set_index, project)
        return self._cache[key]

    def _on_attn2(self, module, args, kwargs):
        if not self.enabled:
            return None
        ehs = kwargs.get("encoder_hidden_states")
        if ehs is None:
            return None
        kwargs["encoder_hidden_states"] = self.layout.insert(ehs, self._layer_tokens(0))
        return args, kwargs

    def _make_block_pre(self, layer: int):
        def hook(module, args, kwargs):
            if not self.enabled:
                return None
            tokens = self._layer_tokens(layer)
            if self.layout.arch == FLUX:
                return self._flux_block_inputs(args, kwargs, tokens)
            if "encoder_hidden_states" in kwargs:
                kwargs["encoder_hidden_states"] = self.layout.insert(kwargs["encoder_hidden_states"], tokens)
            else:  # gradient-checkpointing path passes everything positionally
                args = (args[0], self.layout.insert(args[1], tokens)) + tuple(args[2:])
            return args, kwargs
        return hook

    def _flux_block_inputs(self, args, kwargs, tokens):
        """FluxTransformerBlock(hidden_states, encoder_hidden_states, temb, image_rotary_emb, ...):
        insert the tokens into the text stream and rows for them into the rotary (cos, sin)."""
        names = ("hidden_states", "encoder_hidden_states", "temb", "image_rotary_emb", "joint_attention_kwargs")
        bound = dict(zip(names, args))
        bound.update(kwargs)
        txt = bound["encoder_hidden_states"]
        n = txt.shape[1]
        bound["encoder_hidden_states"] = self.layout.insert(txt, tokens)
        rope = bound.get("image_rotary_emb")
        if rope is not None:  # (cos, sin), each (n_text + n_image, head_dim)
            bound["image_rotary_emb"] = tuple(self.layout.rope_rows(r, n, dim=0) for r in rope)
        return (), bound

    def _block_post(self, module, args, output):
        if not self.enabled:
            return None
        ehs, hs = output
        return (None if ehs is None else self.layout.strip(ehs)), hs


def _unet_cross_attentions(model, group: str):
    blocks = getattr(model, _UNET_GROUPS[group])
    blocks = [blocks] if group == "mid" else list(blocks)
    for block in blocks:
        if block is None:
            continue
        for name, mod in block.named_modules():
            if name.endswith("attn2") and getattr(mod, "is_cross_attention", True):
                yield mod
