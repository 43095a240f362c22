"""Token files: our .safetensors format, and safe import of the official .pth releases.

Our format: a .safetensors file with tensors ``static`` (n_sets, n_layers, m, width) and
optionally ``time`` (100, n_layers * text_width), plus string metadata:
``format`` = "soft-tokens", ``format_version``, ``method``, ``arch``, ``layout`` (JSON of
TokenLayout), ``source`` and, when known, ``train_config`` (JSON).

Official files (ALGORITHMS 5): SoftREPA ``dc_tokens.pth`` (+ optional ``dc_t_tokens.pth``) and
AGSM ``soft_tokens.pth`` + ``soft_t_tokens.pth``. They are pickles, read only with
``torch.load(weights_only=True)`` and ``nn.Embedding`` allowed, never a full unpickle.
"""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, safe_open
from safetensors.torch import save as safetensors_bytes

from .checkpoint import atomic_write_bytes
from .layouts import ARCH_FAMILY, MMDIT, N_BUCKETS, UNET, TokenLayout, default_blocks
from .tokens import SoftTokens, check_finite

FORMAT = "soft-tokens"
FORMAT_VERSION = "1"
OFFICIAL_FILES = {"softrepa": ("dc_tokens.pth", "dc_t_tokens.pth"),
                  "agsm": ("soft_tokens.pth", "soft_t_tokens.pth")}
SD3_HIDDEN = 1536
SD3_EMBED = 4096


# --- our format ---------------------------------------------------------------------------

def save_tokens(tokens: SoftTokens, path, train_config: dict | None = None,
                overwrite: bool = True) -> Path:
    """Write tokens to a .safetensors file atomically (temp file + rename). Returns the path."""
    path = Path(path)
    if path.suffix != ".safetensors":
        raise ValueError(f"token files are .safetensors, got {path.name!r}")
    if path.exists() and not overwrite:
        raise FileExistsError(f"{path} exists; choose another name or allow overwriting")
    check_finite(tokens, f"refusing to write {path}")
    tensors = {"static": tokens.static.detach().to("cpu", torch.float32).contiguous()}
    if tokens.time is not None:
        tensors["time"] = tokens.time.detach().to("cpu", torch.float32).contiguous()
    layout = tokens.layout
    meta = {"format": FORMAT, "format_version": FORMAT_VERSION, "method": layout.method,
            "arch": layout.arch, "layout": layout.to_json()}
    meta.update({k: str(v) for k, v in tokens.meta.items() if k not in meta})
    if train_config is not None:
        meta["train_config"] = json.dumps(train_config, sort_keys=True, default=str)
    atomic_write_bytes(path, safetensors_bytes(tensors, metadata=meta))
    return path


def read_safetensors(path) -> SoftTokens:
    """Load one of our .safetensors token files."""
    path = Path(path)
    try:
        with safe_open(str(path), framework="pt") as f:
            meta = f.metadata() or {}
        tensors = load_file(str(path))
    except (SafetensorError, OSError, ValueError) as e:
        raise ValueError(f"{path} is not a readable .safetensors file ({e}). Re-download or re-save it.") from e
    if meta.get("format") != FORMAT:
        raise ValueError(f"{path} is a .safetensors file but not a soft-token file (no '{FORMAT}' metadata); "
                         "official .pth files can be converted with `python -m training convert`.")
    if meta.get("format_version") != FORMAT_VERSION:
        raise ValueError(f"{path} has soft-token format version {meta.get('format_version')!r}; "
                         f"this version of the pack reads version {FORMAT_VERSION}.")
    layout = TokenLayout.from_json(meta["layout"])
    extra = {k: v for k, v in meta.items() if k not in ("format", "format_version", "method", "arch", "layout")}
    if "static" not in tensors:
        raise ValueError(f"{path} has no 'static' tensor")
    tokens = SoftTokens(layout, tensors["static"], tensors.get("time"), meta=extra)
    check_finite(tokens, str(path))
    return tokens


def train_config_of(tokens: SoftTokens) -> dict | None:
    """The training configuration stored with the tokens, if any."""
    text = tokens.meta.get("train_config")
    return json.loads(text) if text else None


# --- official .pth files ------------------------------------------------------------------

def safe_torch_load(path) -> torch.Tensor:
    """Read one official .pth file as a plain fp32 tensor, refusing anything but known layouts.

    Allowed: a bare tensor or nn.Parameter, a pickled nn.Embedding module (its weight), or a
    state dict with a single 'weight'. Never unpickles arbitrary objects.
    """
    path = Path(path)
    try:
        with torch.serialization.safe_globals([torch.nn.Embedding]):
            obj = torch.load(str(path), map_location="cpu", weights_only=True)
    except (pickle.UnpicklingError, RuntimeError, AttributeError, EOFError, ValueError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ValueError(f"{path} was refused: it is not a known official soft-token file "
                         f"(only tensors and nn.Embedding modules are read; {first})") from e
    if isinstance(obj, torch.nn.Embedding):
        obj = obj.weight
    elif isinstance(obj, dict) and set(obj) == {"weight"}:
        obj = obj["weight"]
    if not isinstance(obj, torch.Tensor):
        raise ValueError(f"{path} holds a {type(obj).__name__}, not a token tensor or nn.Embedding")
    return obj.detach().to(torch.float32).contiguous()


def find_official(folder) -> tuple:
    """(method, static_path, time_path or None) for an official token folder, or raise."""
    folder = Path(folder)
    for method, (static_name, time_name) in OFFICIAL_FILES.items():
        static = folder / static_name
        if static.is_file():
            time = folder / time_name
            return method, static, (time if time.is_file() else None)
    raise ValueError(f"{folder} holds no official token file: expected dc_tokens.pth (SoftREPA) "
                     "or soft_tokens.pth (AGSM)")


def is_official_folder(folder) -> bool:
    folder = Path(folder)
    return folder.is_dir() and any((folder / names[0]).is_file() for names in OFFICIAL_FILES.values())


def layout_from_official(static: torch.Tensor, time: torch.Tensor | None, method: str,
                         arch: str | None = None, blocks=None, name: str = "") -> TokenLayout:
    """Infer the layout of official tensors from their shapes (ALGORITHMS 5.3)."""
    shape = tuple(static.shape)
    sets = 2 if method == "agsm" else 1
    rank_unet, rank_mmdit = (2, 3) if sets == 1 else (3, 4)
    if sets == 2 and shape[0] != 2:
        raise ValueError(f"{name}: AGSM tokens must have 2 sets (psi+, psi-) in dim 0, got shape {shape}")
    if len(shape) == rank_unet:
        m, width = shape[-2:]
        guess = {768: "sd15", 2048: "sdxl"}.get(width)
        arch = arch or guess
        if arch is None or ARCH_FAMILY[arch] != UNET:
            raise ValueError(f"{name}: UNet tokens of width {width} do not match SD1.5 (768) or SDXL (2048); "
                             "pass the architecture explicitly")
        text_width, n_layers = width, 1
    elif len(shape) == rank_mmdit:
        n_layers, m, width = shape[-3:]
        arch = arch or "sd3"
        if ARCH_FAMILY[arch] != MMDIT:
            raise ValueError(f"{name}: per-layer tokens of shape {shape} are MMDiT tokens, not {arch}")
        if time is not None:
            text_width = time.shape[1] // n_layers
        else:
            text_width = SD3_HIDDEN if width in (SD3_HIDDEN, SD3_EMBED) else width
    else:
        raise ValueError(f"{name}: token tensor of shape {shape} is not a known {method} layout "
                         "(SoftREPA: (m, d) or (L, m, d); AGSM: (2, m, d) or (2, L, m, d))")
    if time is not None:
        if time.ndim != 2 or time.shape[0] != N_BUCKETS or time.shape[1] != n_layers * text_width:
            raise ValueError(f"{name}: time table of shape {tuple(time.shape)} does not fit tokens of shape "
                             f"{shape}; expected ({N_BUCKETS}, {n_layers * text_width})")
    if blocks is None:
        blocks = default_blocks(arch, method, n_layers)
    layout = TokenLayout(arch=arch, method=method, n_tokens=m, width=width, text_width=text_width,
                         blocks=tuple(blocks), time_buckets=N_BUCKETS if time is not None else 0)
    if layout.n_layers != n_layers:
        raise ValueError(f"{name}: {n_layers} token layers but {len(layout.blocks)} blocks were chosen")
    return layout


def read_official(path, arch: str | None = None, blocks=None) -> SoftTokens:
    """Import an official token folder (or its static .pth file) as SoftTokens.

    blocks overrides the block groups the release was trained with (default_blocks); the
    choice is recorded in the layout and so in any converted file.
    """
    path = Path(path)
    if path.is_dir():
        method, static_path, time_path = find_official(path)
    else:
        method = next((m for m, names in OFFICIAL_FILES.items() if path.name == names[0]), None)
        if method is None:
            raise ValueError(f"{path.name} is not an official static token file "
                             f"({', '.join(n[0] for n in OFFICIAL_FILES.values())})")
        time_path = path.with_name(OFFICIAL_FILES[method][1])
        static_path, time_path = path, (time_path if time_path.is_file() else None)
    static = safe_torch_load(static_path)
    time = safe_torch_load(time_path) if time_path is not None else None
    layout = layout_from_official(static, time, method, arch, blocks, name=str(static_path))
    n_sets, n_layers = len(layout.sets), layout.n_layers
    static = static.reshape(n_sets, n_layers, layout.n_tokens, layout.width)
    meta = {"source": f"official {method} release ({static_path.name}"
                      + (f" + {time_path.name})" if time_path else ")"),
            "blocks_choice": "user override" if blocks is not None else "release default"}
    tokens = SoftTokens(layout, static, time, meta=meta)
    check_finite(tokens, str(path))
    return tokens


def load_tokens(path, arch: str | None = None, blocks=None) -> SoftTokens:
    """Load any supported token source: our .safetensors, an official folder, or an official .pth."""
    path = Path(path)
    if not path.exists():
        raise ValueError(f"token file {path} does not exist")
    if path.is_dir() or path.suffix == ".pth":
        return read_official(path, arch=arch, blocks=blocks)
    tokens = read_safetensors(path)
    if blocks is not None:
        layout = tokens.layout.replace(blocks=tuple(blocks))
        if layout.n_layers != tokens.layout.n_layers:
            raise ValueError(f"{path}: has {tokens.layout.n_layers} token layers, cannot apply them to "
                             f"{len(layout.blocks)} blocks {list(layout.blocks)}")
        tokens.layout = layout
    return tokens
