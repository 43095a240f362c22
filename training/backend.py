"""The backend interface: the small protocol between the training engine and a model family.

A backend knows its model's forward process (how x0 and noise become z_t, and what the
native regression target is) and predicts that target for a batch of (z_t, t, conditioning)
with the soft tokens of a given set. Losses and the trainer only talk to this protocol, so
the same engine runs on diffusers models (``training/diffusers_backend.py``) and on ComfyUI
models (``nodes/``).

Conventions:
- ``t`` is a LongTensor (N,) of integer timesteps in 0..999 (training samples them uniformly).
- Conditioning is a ``Cond``: a dict of tensors whose first dim is the prompt batch, e.g.
  ``{"context": (P, 77, 768)}`` for SD1.5, plus ``"text_embeds"``/``"time_ids"`` for SDXL or
  ``"pooled"`` for SD3. ``select_cond`` picks rows.
- ``tokens`` is passed per call, so one backend serves online and EMA tokens (AGSM) and the
  plain model (``tokens=None``).
- ``set_index`` is an int for the whole batch or a LongTensor (N,) (AGSM polarity: 0 = psi+,
  1 = psi-).
"""

from __future__ import annotations

from typing import Protocol

import torch

from .tokens import SoftTokens

Cond = dict


def select_cond(cond: Cond, index: torch.Tensor) -> Cond:
    """Rows ``index`` of every tensor in a conditioning dict."""
    return {k: v[index] for k, v in cond.items()}


class Backend(Protocol):
    prediction: str  # "epsilon" (SD1.5/SDXL) or "flow" (SD3 velocity eps - x0)

    def noisy(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """z_t from clean latents x0 (N,C,h,w), noise (N or 1,C,h,w) and t (N,)."""

    def target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The native regression target: noise (epsilon) or noise - x0 (flow)."""

    def predict(self, z_t: torch.Tensor, t: torch.Tensor, cond: Cond,
                tokens: SoftTokens | None, set_index=0) -> torch.Tensor:
        """The denoiser's prediction (N,C,h,w) for z_t at t with conditioning rows ``cond``.

        ``tokens`` are inserted per their layout (None runs the plain frozen model); gradients
        flow into them when grad is enabled. The frozen backbone never receives gradients.
        """


# --- forward processes shared by backends ----------------------------------------------------

def scaled_linear_alphas_cumprod(beta_start: float = 0.00085, beta_end: float = 0.012,
                                 n: int = 1000) -> torch.Tensor:
    """alpha-bar of Stable Diffusion's 'scaled_linear' DDPM schedule (float64)."""
    betas = torch.linspace(beta_start ** 0.5, beta_end ** 0.5, n, dtype=torch.float64) ** 2
    return torch.cumprod(1.0 - betas, dim=0)


def eps_noisy(alphas_cumprod: torch.Tensor, x0, noise, t):
    """sqrt(abar_t) x0 + sqrt(1 - abar_t) noise, as DDIMScheduler.add_noise."""
    abar = alphas_cumprod.to(x0.device)[t].to(x0.dtype).view(-1, *([1] * (x0.ndim - 1)))
    return abar.sqrt() * x0 + (1 - abar).sqrt() * noise


def flow_noisy(x0, noise, t):
    """(1 - sigma) x0 + sigma noise with sigma = t / 1000 (SD3 training, ALGORITHMS 2.1)."""
    sigma = (t.to(x0.dtype) / 1000.0).view(-1, *([1] * (x0.ndim - 1)))
    return (1 - sigma) * x0 + sigma * noise
