"""Token layouts: the single source of truth for where soft tokens live in each architecture.

A layout answers, for one token file and one model family:
- which layers get tokens (UNet block groups, or MMDiT joint-block indices);
- where the tokens enter the text sequence and how they are removed again;
- the width of the static tokens and whether they are projected by the model's
  ``context_embedder`` first (SD3 4096-wide tokens) or live in the text stream's own width;
- the time table and its bucketing;
- the token sets (one for SoftREPA; psi+ and psi- for AGSM).

Both the ComfyUI patch (``nodes/patch.py``) and the diffusers hooks (``training/diffusers_hooks.py``)
call into this module, so the two cannot drift apart. See ALGORITHMS.md section 1.
"""

from __future__ import annotations

import dataclasses
import json
from dataclasses import dataclass

import torch

UNET = "unet"
MMDIT = "mmdit"

# Architecture presets. Widths are those of the released models; tiny test models use the
# same families with other widths (a layout carries its own widths).
ARCH_FAMILY = {"sd15": UNET, "sdxl": UNET, "sd3": MMDIT, "flux": MMDIT,
               # SD2.x: the SD1.5 UNet with 1024-wide (OpenCLIP-H) context; 768-v models predict v.
               "sd2": UNET,
               # SD3.5 Medium (MMDiT-X: 1536 wide, 24 blocks, dual attention in blocks 0-12) and Large
               # (2432 wide, 38 blocks): the SD3 mechanism; told from SD3 by its qk-norm (RMSNorm).
               "sd35": MMDIT}
# Readable preset names, for messages.
ARCH_NAMES = {"sd15": "SD1.5", "sd2": "SD2.x", "sdxl": "SDXL", "sd3": "SD3", "sd35": "SD3.5", "flux": "Flux.1"}
# Flux.1 (dev, schnell): double-stream blocks with rotary text positions and a sigma timestep.
# See TokenLayout.rope_rows and timestep_scale.
FLUX = "flux"
FLUX_HIDDEN, FLUX_EMBED = 3072, 4096
UNET_GROUPS = ("down", "mid", "up")
POSITIONS = ("after_bos", "prepend", "append")
METHODS = ("softrepa", "agsm")
SETS = {"softrepa": ("main",), "agsm": ("pos", "neg")}

N_BUCKETS = 100
T_MAX = 1000


def time_bucket(t: torch.Tensor, n_buckets: int = N_BUCKETS) -> torch.Tensor:
    """Map timesteps (any shape, float or int, 0..1000) to time-table rows, as the official code does.

    The timestep is truncated to an integer (toward zero). If *any* element is >= 1000, 1 is
    subtracted from *all* of them (so SD3's first step t=1000 lands in bucket 99). Then
    bucket = t // 10. Values outside 0..999 after that rule are clamped into range.
    """
    ti = t.to(torch.int64)
    ti = ti - (ti >= T_MAX).any().to(torch.int64)  # no host sync: a 0-dim tensor
    return torch.div(ti, T_MAX // n_buckets, rounding_mode="floor").clamp(0, n_buckets - 1)


@dataclass(frozen=True)
class TokenLayout:
    """Where and how a set of soft tokens is inserted into one model family.

    Attributes:
        arch: "sd15", "sd2", "sdxl", "sd3", "sd35" or "flux" (the preset the tokens were made for).
        method: "softrepa" or "agsm" (decides the token sets).
        n_tokens: m, tokens per set and layer.
        width: width of the stored static tokens.
        text_width: width of the text stream the tokens are inserted into (the UNet's
            cross-attention width, or the MMDiT hidden width).
        blocks: UNet block groups ("down", "mid", "up") sharing one token set, or the MMDiT
            joint-block indices; token layer k goes to blocks[k].
        time_buckets: rows of the time table (100), or 0 for no time-dependent part.
        position: "after_bos" (UNet), "prepend" (SoftREPA SD3) or "append" (AGSM SD3).
    """

    arch: str
    method: str
    n_tokens: int
    width: int
    text_width: int
    blocks: tuple
    time_buckets: int = N_BUCKETS
    position: str = ""

    def __post_init__(self):
        if self.arch not in ARCH_FAMILY:
            raise ValueError(f"unknown architecture {self.arch!r}; expected one of {sorted(ARCH_FAMILY)}")
        if self.method not in METHODS:
            raise ValueError(f"unknown method {self.method!r}; expected one of {METHODS}")
        if self.n_tokens < 1:
            raise ValueError(f"n_tokens must be >= 1, got {self.n_tokens}")
        if self.time_buckets not in (0, N_BUCKETS):
            raise ValueError(f"time_buckets must be 0 or {N_BUCKETS}, got {self.time_buckets}")
        blocks = tuple(self.blocks)
        if not blocks:
            raise ValueError("a layout needs at least one block")
        if self.family == UNET:
            bad = [b for b in blocks if b not in UNET_GROUPS]
            if bad:
                raise ValueError(f"UNet block groups must be among {UNET_GROUPS}, got {bad}")
            blocks = tuple(g for g in UNET_GROUPS if g in blocks)  # canonical order, no duplicates
            if self.width != self.text_width:
                raise ValueError("UNet tokens live in the cross-attention space: width must equal text_width")
        else:
            blocks = tuple(int(b) for b in blocks)
            if min(blocks) < 0 or len(set(blocks)) != len(blocks):
                raise ValueError(f"MMDiT blocks must be distinct non-negative indices, got {blocks}")
        object.__setattr__(self, "blocks", blocks)
        position = self.position or default_position(self.arch, self.method)
        if position not in POSITIONS:
            raise ValueError(f"position must be one of {POSITIONS}, got {position!r}")
        if (position == "after_bos") != (self.family == UNET):
            raise ValueError(f"position {position!r} does not fit the {self.family} family")
        object.__setattr__(self, "position", position)

    # --- derived facts -------------------------------------------------------------------
    @property
    def family(self) -> str:
        return ARCH_FAMILY[self.arch]

    @property
    def sets(self) -> tuple:
        return SETS[self.method]

    @property
    def n_layers(self) -> int:
        """Token layers: 1 for UNets (one set shared by all enabled layers), else one per block."""
        return 1 if self.family == UNET else len(self.blocks)

    @property
    def projected(self) -> bool:
        """True when static tokens pass through the model's frozen context_embedder (SD3 4096-d)."""
        return self.width != self.text_width

    @property
    def timestep_scale(self) -> float:
        """Factor from the denoiser's timestep argument to the 0..1000 time-table scale.

        SD3 (ComfyUI and diffusers) passes t = 1000 sigma already: 1. Flux passes sigma in [0, 1]
        (ComfyUI's ModelSamplingFlux.timestep(sigma) = sigma; diffusers' FluxTransformer2DModel
        takes timestep = sigma and multiplies by 1000 inside): 1000, so t = 1000 sigma and the
        buckets are those of SD3's flow schedule (ALGORITHMS 1.5; first step sigma = 1 -> 99).
        """
        return 1000.0 if self.arch == FLUX else 1.0

    @property
    def static_shape(self) -> tuple:
        return (len(self.sets), self.n_layers, self.n_tokens, self.width)

    @property
    def time_shape(self) -> tuple | None:
        return (self.time_buckets, self.n_layers * self.text_width) if self.time_buckets else None

    def layer_of_block(self, block) -> int | None:
        """Token layer used by a block (UNet group name or MMDiT index), or None if it gets none."""
        if self.family == UNET:
            return 0 if block in self.blocks else None
        try:
            return self.blocks.index(int(block))
        except ValueError:
            return None

    # --- insertion and removal -----------------------------------------------------------
    def insert(self, text: torch.Tensor, tokens: torch.Tensor) -> torch.Tensor:
        """Insert tokens (B or 1, m, text_width) into text (B, n, text_width) -> (B, n+m, text_width)."""
        tokens = tokens.to(text.dtype).expand(text.shape[0], -1, -1)
        if self.position == "after_bos":
            return torch.cat([text[:, :1], tokens, text[:, 1:]], dim=1)
        if self.position == "prepend":
            return torch.cat([tokens, text], dim=1)
        return torch.cat([text, tokens], dim=1)

    def strip(self, text: torch.Tensor) -> torch.Tensor:
        """Remove the m inserted positions again (MMDiT: after each block)."""
        m = self.n_tokens
        if self.position == "after_bos":
            return torch.cat([text[:, :1], text[:, 1 + m:]], dim=1)
        if self.position == "prepend":
            return text[:, m:]
        return text[:, :-m]

    def token_span(self, n_text: int) -> tuple:
        """(start, stop) of the soft tokens inside a text sequence of n_text original positions."""
        m = self.n_tokens
        start = {"after_bos": 1, "prepend": 0, "append": n_text}[self.position]
        return start, start + m

    def text_positions(self, n_text: int) -> torch.Tensor:
        """Indices (n_text,) where the original text positions sit after ``insert`` (soft tokens skipped)."""
        start, stop = self.token_span(n_text)
        idx = torch.arange(n_text)
        return torch.where(idx >= start, idx + (stop - start), idx)

    def rope_rows(self, pe: torch.Tensor, n_text: int, dim: int) -> torch.Tensor:
        """Rotary table for the text stream after ``insert`` (Flux).

        Flux applies rotary position embeddings to text and image tokens together: ``pe`` is
        computed once before the blocks from cat(txt_ids, img_ids), so it has n_text text rows
        followed by the image rows along ``dim``. The inserted tokens need rows too. They get
        the rotary entries of a *text* position: the text row next to where they go (the first
        text row for "prepend", the last for "append"). Flux's text ids are all zero, so this is
        the identity rotation at every frequency, exactly what every text token gets: the soft
        tokens are positioned like text, and relative to the image they sit where the prompt
        sits. Returns pe with m rows inserted at ``token_span(n_text)``; the image rows and the
        original text rows keep their entries, so the text and image tokens see the same
        rotations as without tokens.
        """
        start, stop = self.token_span(n_text)
        src = start if self.position == "prepend" else max(start - 1, 0)
        rows = pe.narrow(dim, src, 1)
        rows = rows.expand(*pe.shape[:dim], stop - start, *pe.shape[dim + 1:])
        return torch.cat([pe.narrow(dim, 0, start), rows, pe.narrow(dim, start, pe.shape[dim] - start)], dim=dim)

    # --- compatibility with a loaded model -----------------------------------------------
    def check_model(self, family: str, text_width: int, n_blocks: int | None = None,
                    embed_width: int | None = None, name: str = "token file",
                    model_arch: str | None = None) -> None:
        """Raise ValueError naming both sides if these tokens do not fit the described model.

        family/text_width describe the model's text stream (UNet cross-attention width or
        MMDiT hidden width); n_blocks is the MMDiT joint-block count; embed_width the input
        width of its context_embedder (needed for projected tokens). model_arch: "flux" for a
        Flux model (None or another name otherwise); Flux tokens and SD3 tokens do not mix.
        """
        what = f"{name} ({self.describe()})"
        if (model_arch == FLUX) != (self.arch == FLUX) and family == self.family:
            ours = ARCH_NAMES[self.arch]
            theirs = ARCH_NAMES.get(model_arch, "an SD3-type MMDiT") if model_arch else "an SD3-type MMDiT"
            raise ValueError(f"{what} is for {ours}, but the loaded model is {theirs}. Flux tokens need "
                             "Flux's rotary text positions and sigma timesteps, SD3 tokens neither; use "
                             "tokens trained for this model's architecture.")
        if family != self.family:
            named = f" ({ARCH_NAMES.get(model_arch, model_arch)})" if model_arch else ""
            raise ValueError(f"{what} is for a {self.family.upper()} model, but the loaded model is "
                             f"a {family.upper()} model{named}. Use tokens trained for this model's architecture.")
        if text_width != self.text_width:
            raise ValueError(f"{what} has text width {self.text_width}, but the loaded model's text "
                             f"stream is {text_width} wide ({_guess_arch(family, text_width)}). "
                             "Use tokens trained for this model.")
        if self.family == MMDIT:
            sd3_type = ("sd3", "sd35")  # same widths possible (SD3 and SD3.5 Medium): told apart by model_arch
            if model_arch in sd3_type and self.arch in sd3_type and model_arch != self.arch:
                raise ValueError(f"{what} was made for {ARCH_NAMES[self.arch]}, but the loaded model is "
                                 f"{ARCH_NAMES[model_arch]}. Use tokens trained for this model.")
            if n_blocks is not None and max(self.blocks) >= n_blocks:
                raise ValueError(f"{what} needs joint blocks {list(self.blocks)}, but the loaded "
                                 f"model has only {n_blocks} joint blocks.")
            if self.projected and embed_width != self.width:
                raise ValueError(f"{what} stores {self.width}-wide tokens for the context_embedder, "
                                 f"but the loaded model's context_embedder takes {embed_width}.")

    def describe(self) -> str:
        where = "+".join(self.blocks) if self.family == UNET else f"blocks {_ranges(self.blocks)}"
        time = "time table" if self.time_buckets else "no time table"
        return (f"{self.method} {self.arch}, {self.n_tokens} tokens x {self.width}, {where}, "
                f"{self.position}, {time}")

    # --- (de)serialisation ---------------------------------------------------------------
    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> "TokenLayout":
        d = json.loads(text)
        d["blocks"] = tuple(d["blocks"])
        return cls(**d)

    def replace(self, **changes) -> "TokenLayout":
        return dataclasses.replace(self, **changes)


def default_position(arch: str, method: str) -> str:
    """UNets insert after BOS; SoftREPA SD3 prepends, AGSM SD3 appends (ALGORITHMS 1.1, 1.3)."""
    if ARCH_FAMILY[arch] == UNET:
        return "after_bos"
    return "append" if method == "agsm" else "prepend"


def default_blocks(arch: str, method: str, n_layers: int = 5) -> tuple:
    """Block groups each official release was trained with (ALGORITHMS 4.1, pitfall 10).

    SoftREPA SD1.5: down only; SoftREPA SDXL and every AGSM UNet: down + mid; SD3: the first
    n_layers joint blocks. SD2.x and SD3.5 (no official tokens) take their sibling's choice:
    SD2.x that of SD1.5 (the same UNet), SD3.5 that of SD3.

    Flux.1 (our extrapolation; neither paper has Flux code, ALGORITHMS 0.1): the first n_layers
    double-stream blocks (0-4 by default), with SD3's reasoning: the input-side blocks, where the
    text stream is still close to the prompt, and 5 of Flux's 19 double blocks is about SD3's
    5 of 24. Tokens are prepended (SoftREPA) or appended (AGSM), 4 per layer by default, and
    live directly in the 3072-wide text stream after ``txt_in`` (width = text_width = 3072, as
    the released SD3 tokens live in the 1536 stream): no dependence on ``txt_in``'s weights,
    and 4096-wide tokens projected by the frozen ``txt_in`` remain possible (width 4096). They
    never reach the single-stream blocks: they are removed after each double block they enter.
    """
    if ARCH_FAMILY[arch] == MMDIT:
        return tuple(range(n_layers))
    if arch in ("sd15", "sd2") and method == "softrepa":
        return ("down",)
    return ("down", "mid")


TIME_TABLE_CHOICES = ("official", "on", "off")


def uses_time_table(arch: str, method: str, choice: str = "official") -> bool:
    """Whether tokens get the time table: "on", "off", or "official" (off only for SoftREPA SDXL, ALGORITHMS 4.1)."""
    if choice not in TIME_TABLE_CHOICES:
        raise ValueError(f"time table choice must be official, on or off, got {choice!r}")
    if choice == "official":
        return not (arch == "sdxl" and method == "softrepa")
    return choice == "on"


def parse_blocks(text: str) -> tuple:
    """Parse a user's block choice: "down,mid" (UNet groups), or "0-4" / "0,1,2" (MMDiT blocks)."""
    parts = [p.strip() for p in str(text).split(",") if p.strip()]
    if not all(p.replace("-", "").isdigit() for p in parts):
        return tuple(parts)
    out = []
    for p in parts:
        a, _, b = p.partition("-")
        out.extend(range(int(a), int(b or a) + 1))
    return tuple(out)


def _guess_arch(family: str, text_width: int) -> str:
    if family == UNET:
        return {768: "SD1.5-like", 1024: "SD2-like", 2048: "SDXL-like"}.get(text_width, "UNet")
    return {1536: "SD3-medium- or SD3.5-medium-like", 2432: "SD3.5-large-like"}.get(text_width, "MMDiT")


def _ranges(idx) -> str:
    idx = list(idx)
    if idx == list(range(idx[0], idx[0] + len(idx))):
        return f"{idx[0]}-{idx[-1]}" if len(idx) > 1 else str(idx[0])
    return ",".join(map(str, idx))
