"""Step-selected semantic refinement: IterRef at one denoising step (STEP_SELECTION.md 6).

Sampling pauses at one chosen step; the latent is then refined a few times with the gradient of
an attention-map loss (``attention_maps.py``) on the conditional prompt alone, and sampling goes
on from the refined latent. ``refine_latent`` is the loop, shared by every model; this module
also holds the attention capture for diffusers denoisers (UNet cross-attention, SD3 joint
attention). The ComfyUI capture lives in ``nodes/refine_capture.py``.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from .attention_maps import LOSSES, attention_probs
from .layouts import TokenLayout


@dataclass(frozen=True)
class RefineSettings:
    """IterRef's knobs.

    iterations: maximum gradient steps on the latent (0: no refinement at all).
    loss: "cn" (neglect), "iou" (overlap) or "cn+iou" (their mean, the official combination).
    scale, scale_range: alpha_i = scale * sqrt(linspace(r0, r1, n_steps)[i]).
    threshold: an image stops early once its loss is <= threshold (0: run every iteration,
        as the official defaults do).
    smoothing: 3x3 Gaussian smoothing of the subject maps.
    """

    iterations: int = 20
    loss: str = "cn+iou"
    scale: float = 20.0
    scale_range: tuple = (1.0, 0.5)
    threshold: float = 0.0
    smoothing: bool = True

    def __post_init__(self):
        if self.loss not in LOSSES:
            raise ValueError(f"loss must be one of {LOSSES}, got {self.loss!r}")
        if not (isinstance(self.iterations, int) and self.iterations >= 0):
            raise ValueError(f"iterations must be an integer >= 0, got {self.iterations!r}")
        if not (math.isfinite(self.scale) and self.scale >= 0):
            raise ValueError(f"scale (step size) must be a finite number >= 0, got {self.scale}")
        if not (math.isfinite(self.threshold) and self.threshold >= 0):
            raise ValueError(f"threshold must be a finite number >= 0, got {self.threshold}")


def refine_latent(x: torch.Tensor, loss_fn, alpha: float, iterations: int, threshold: float = 0.0):
    """IterRef: up to ``iterations`` times, x <- x - alpha * grad_x loss(x), per image.

    ``loss_fn(x)`` runs the conditional forward with attention capture and returns
    ``attention_maps.batch_loss``'s dict of (B,) tensors. Each image gets the gradient of its own
    loss and stops once its loss is <= ``threshold`` (with threshold > 0). Returns the refined
    latent (detached, same dtype) and the history: one dict of per-image loss lists per forward.
    """
    x = x.detach().clone()
    history = []
    done = torch.zeros(x.shape[0], dtype=torch.bool, device=x.device)
    for _ in range(iterations):
        with torch.enable_grad():
            xg = x.to(torch.promote_types(x.dtype, torch.float32)).requires_grad_(True)
            losses = loss_fn(xg)
            history.append({k: v.detach().float().cpu().tolist() for k, v in losses.items()})
            if threshold > 0:
                done = done | (losses["loss"].detach() <= threshold)
                if bool(done.all()):
                    break
            active = ~done
            (grad,) = torch.autograd.grad(losses["loss"][active].sum(), xg, allow_unused=True)
        if grad is None:  # the loss does not depend on x (e.g. all subject maps constant)
            break
        grad = torch.nan_to_num(grad) * active.view(-1, *([1] * (x.ndim - 1)))
        x = (xg.detach() - alpha * grad).to(x.dtype)
    return x, history


# --- attention capture for diffusers denoisers -----------------------------------------------

class AttentionCapture:
    """Records text->image attention maps of a diffusers denoiser while entered.

    UNet (``UNet2DConditionModel``): every cross-attention (``attn2``) whose query grid has
    ``grid`` = (H, W) positions, softmax(q k^T * scale) averaged over heads.
    SD3 (``SD3Transformer2DModel``): every joint block (or ``blocks``), the image-query x
    text-key part of the joint softmax, averaged over heads.
    ``maps()`` averages the recorded layers: (B, H, W, n_text).

    Soft tokens inserted by a ``TokenInjector`` of ``token_layout`` are dropped from the columns
    (``TokenLayout.text_positions``), so positions always refer to the prompt's own tokens.
    The maps keep their autograd graph: gradients flow back to the latent.
    """

    def __init__(self, model, grid: tuple | None = None, blocks=None, token_layout: TokenLayout | None = None):
        self.model, self.token_layout = model, token_layout
        self.mmdit = hasattr(model, "transformer_blocks") and hasattr(model, "context_embedder")
        if not self.mmdit and not hasattr(model, "down_blocks"):
            raise ValueError(f"{type(model).__name__} is not a supported denoiser for attention capture")
        if not self.mmdit and grid is None:
            raise ValueError("a UNet capture needs the attention grid (H, W), e.g. the latent size / 4")
        self.grid = tuple(grid) if grid is not None else None
        if self.mmdit:
            n = len(model.transformer_blocks)
            self.blocks = tuple(range(n)) if blocks is None else tuple(blocks)
            if not self.blocks or not all(0 <= b < n for b in self.blocks):
                raise ValueError(f"blocks must be joint-block indices in 0..{n - 1}, got {blocks}")
        self.layers, self.n_text, self._handles = [], None, []

    def __enter__(self):
        self.layers, self.n_text = [], None
        self._handles = [self.model.register_forward_pre_hook(self._on_model, with_kwargs=True)]
        if self.mmdit:
            for b in self.blocks:
                attn = self.model.transformer_blocks[b].attn
                self._handles.append(attn.register_forward_hook(self._on_joint, with_kwargs=True))
        else:
            for name, mod in self.model.named_modules():
                if name.endswith("attn2") and getattr(mod, "is_cross_attention", False):
                    self._handles.append(mod.register_forward_hook(self._on_cross, with_kwargs=True))
        return self

    def __exit__(self, *exc):
        for h in self._handles:
            h.remove()
        self._handles = []

    def maps(self) -> torch.Tensor:
        """The mean over recorded layers, (B, H, W, n_text); H, W from ``grid`` or the SD3 patch grid."""
        if not self.layers:
            raise ValueError("no attention was captured: no layer matched (check the grid / blocks)")
        A = torch.stack(self.layers).mean(dim=0)
        h, w = self.grid if self.grid else self._dit_grid
        return A.reshape(A.shape[0], h, w, A.shape[-1])

    # --- hooks -----------------------------------------------------------------------------
    def _on_model(self, module, args, kwargs):
        where = 1 if self.mmdit else 2  # forward(hidden_states, encoder_hidden_states) / (sample, timestep, ...)
        ehs = kwargs.get("encoder_hidden_states", args[where] if len(args) > where else None)
        self.n_text = ehs.shape[1]
        if self.mmdit:
            sample = kwargs.get("hidden_states", args[0] if args else None)
            p = module.config.patch_size
            self._dit_grid = (sample.shape[-2] // p, sample.shape[-1] // p)

    def _text_columns(self, probs: torch.Tensor) -> torch.Tensor:
        n = probs.shape[-1]
        if n == self.n_text:
            return probs
        lay = self.token_layout
        if lay is None or n != self.n_text + lay.n_tokens:
            raise ValueError(f"captured {n} text keys for a prompt of {self.n_text}; pass the soft tokens' "
                             f"layout as token_layout")
        return probs[..., lay.text_positions(self.n_text).to(probs.device)]

    def _on_cross(self, attn, args, kwargs, output):
        hs = kwargs.get("hidden_states", args[0] if args else None)
        if hs.ndim != 3 or hs.shape[1] != self.grid[0] * self.grid[1]:
            return
        ehs = kwargs.get("encoder_hidden_states", args[1] if len(args) > 1 else None)
        if getattr(attn, "norm_cross", None) is not None:
            ehs = attn.norm_encoder_hidden_states(ehs)
        q, k = _heads(attn.to_q(hs), attn.heads), _heads(attn.to_k(ehs), attn.heads)
        self.layers.append(self._text_columns(attention_probs(q, k, attn.scale)))

    def _on_joint(self, attn, args, kwargs, output):
        hs = kwargs.get("hidden_states", args[0] if args else None)
        ehs = kwargs.get("encoder_hidden_states", args[1] if len(args) > 1 else None)
        q, k = _heads(attn.to_q(hs), attn.heads), _heads(attn.to_k(hs), attn.heads)
        kt = _heads(attn.add_k_proj(ehs), attn.heads)
        if getattr(attn, "norm_q", None) is not None:
            q, k = attn.norm_q(q), attn.norm_k(k)
        if getattr(attn, "norm_added_k", None) is not None:
            kt = attn.norm_added_k(kt)
        # diffusers' joint order is [image ; text]; image-query rows of the full joint softmax
        probs = attention_probs(q, torch.cat([k, kt], dim=2), attn.scale)
        self.layers.append(self._text_columns(probs[..., hs.shape[1]:]))


def _heads(x: torch.Tensor, heads: int) -> torch.Tensor:
    b, n, c = x.shape
    return x.view(b, n, heads, c // heads).transpose(1, 2)
