"""The SoftTokens module: learned static tokens plus an optional time table, in fp32."""

from __future__ import annotations

import torch
from torch import nn

from .layouts import TokenLayout, time_bucket

INIT_STD = 0.02


class SoftTokens(nn.Module):
    """Soft tokens for one layout.

    Parameters:
        static: (n_sets, n_layers, m, width); set 0 is SoftREPA's only set or AGSM's psi+,
            set 1 is AGSM's psi-.
        time: (100, n_layers * text_width) or None; layer k uses columns
            [k*text_width, (k+1)*text_width) and adds them to all m tokens of that layer.
    """

    def __init__(self, layout: TokenLayout, static: torch.Tensor | None = None,
                 time: torch.Tensor | None = None, generator: torch.Generator | None = None,
                 meta: dict | None = None):
        super().__init__()
        self.layout = layout
        if static is None:
            static = torch.randn(layout.static_shape, generator=generator) * INIT_STD
        if tuple(static.shape) != layout.static_shape:
            raise ValueError(f"static tokens have shape {tuple(static.shape)}, layout expects {layout.static_shape}")
        self.static = nn.Parameter(static.detach().to(torch.float32).clone())
        if layout.time_buckets:
            if time is None:
                time = torch.randn(layout.time_shape, generator=generator) * INIT_STD
            if tuple(time.shape) != layout.time_shape:
                raise ValueError(f"time table has shape {tuple(time.shape)}, layout expects {layout.time_shape}")
            self.time = nn.Parameter(time.detach().to(torch.float32).clone())
        else:
            if time is not None:
                raise ValueError("layout has no time table but a time tensor was given")
            self.register_parameter("time", None)
        self.meta = dict(meta or {})  # free-form facts kept in the file's metadata

    def layer_tokens(self, layer: int, t: torch.Tensor, set_index=0, project=None) -> torch.Tensor:
        """Tokens of one layer for a batch: (B, m, text_width), fp32 (or project's dtype).

        t: (B,) timesteps (0..1000 scale). set_index: an int for the whole batch or a (B,)
        LongTensor of per-sample sets (AGSM polarity). project: the model's context_embedder,
        required when the layout's tokens are projected (SD3 4096-wide).
        """
        if isinstance(set_index, int):
            static = self.static[set_index, layer].unsqueeze(0)  # (1, m, width)
        else:
            static = self.static[set_index.to(self.static.device), layer]  # (B, m, width)
        if self.layout.projected:
            if project is None:
                raise ValueError("these tokens must be projected by the model's context_embedder")
            static = project(static.to(_param_dtype(project)))
        if self.time is None:
            return static.expand(t.shape[0], -1, -1) if static.shape[0] == 1 else static
        w = self.layout.text_width
        rows = self.time[time_bucket(t).to(self.time.device), layer * w:(layer + 1) * w]  # (B, w)
        return static + rows.unsqueeze(1).to(static.dtype)

    def n_params(self) -> int:
        return sum(p.numel() for p in self.parameters())


def check_finite(tokens: SoftTokens, name: str) -> None:
    """Raise ValueError naming ``name`` if the static tokens or the time table hold NaN or inf."""
    for what, tensor in (("static", tokens.static), ("time", tokens.time)):
        if tensor is None:
            continue
        bad = int((~torch.isfinite(tensor.detach())).sum())
        if bad:
            raise ValueError(f"{name}: the '{what}' tensor holds {bad} non-finite value(s) (NaN or inf) of "
                             f"{tensor.numel()}; these tokens would produce NaN images. Retrain, or use the "
                             "run's .best.safetensors file or an earlier checkpoint.")


def _param_dtype(module) -> torch.dtype:
    for p in module.parameters():
        return p.dtype
    return torch.float32
