"""The diffusers backend: the Backend protocol (training/backend.py) for a diffusers denoiser.

Supported denoisers:
- ``UNet2DConditionModel`` (SD1.5, SD2.x, SDXL): epsilon or v prediction (SD2.x 768-v, SDXL
  v-pred derivatives; target sqrt(abar) eps - sqrt(1 - abar) x0), DDIM ``add_noise`` forward
  process with SD's scaled_linear schedule (or the pipeline's scheduler config). Cond keys:
  "context" (P, 77, d); SDXL also "text_embeds" (P, 1280) and "time_ids" (P, 6), passed as
  ``added_cond_kwargs``.
- ``SD3Transformer2DModel`` (SD3): flow prediction, z_t = (1 - s) x0 + s eps with s = t/1000,
  target eps - x0; the model receives the integer t as its timestep. Cond keys: "context"
  (P, n, 4096) and "pooled" (P, 2048).
- ``FluxTransformer2DModel`` (Flux.1 dev/schnell): flow prediction as SD3; the latent
  (N, 16, h, w) is packed into 2x2 patches (N, h/2 * w/2, 64) with image ids (0, row, col)
  and zero text ids, the timestep passed is sigma = t/1000, and the output is unpacked again.
  Cond keys: "context" (P, n, 4096), "pooled" (P, 768) and, for dev (guidance_embeds), an
  optional "guidance" (P,) (default: the backend's ``guidance``, 3.5 as in ComfyUI and
  FluxPipeline); guidance is just conditioning. Schnell has no guidance embedding.

The backbone is frozen (requires_grad False) and kept in eval mode, so dropout is off. Soft
tokens enter through one ``TokenInjector`` per token layout, installed on first use and left
inactive outside ``predict``.

Nothing here touches the network: ``load_denoiser`` reads local files only.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import re
from pathlib import Path

import torch

from .backend import Cond, eps_noisy, flow_noisy, scaled_linear_alphas_cumprod
from .diffusers_hooks import TokenInjector, is_flux, model_family
from .layouts import UNET
from .tokens import SoftTokens

PREDICTIONS = {"unet": "epsilon", "mmdit": "flow"}
AUTOCAST = {None: None, "none": None, "fp32": None, "bf16": torch.bfloat16, "bfloat16": torch.bfloat16,
            "fp16": torch.float16, "float16": torch.float16}
DENOISER_CLASSES = ("UNet2DConditionModel", "SD3Transformer2DModel", "FluxTransformer2DModel")
FLUX_GUIDANCE = 3.5


class DiffusersBackend:
    """Backend for a diffusers UNet2DConditionModel (epsilon) or SD3Transformer2DModel (flow).

    Args:
        denoiser: the diffusers model; it is frozen and put in eval mode.
        prediction: "epsilon" or "flow"; None picks the family's (UNet: epsilon, SD3: flow).
            UNets also take "v" (v-prediction: SD2.x 768-v, SDXL v-pred derivatives); target
            sqrt(abar) eps - sqrt(1 - abar) x0 (``prediction_from_folder`` reads a pipeline's).
        alphas_cumprod: alpha-bar table (1000,) for epsilon and v models; None: SD's scaled_linear.
        extra_cond_fn: optional ``fn(z_t, t, cond) -> dict`` of extra keyword arguments for
            the denoiser call (for models that need more than the standard cond keys).
        gradient_checkpointing: recompute the frozen backbone's activations in backward
            (diffusers' checkpointing, active whenever grad is enabled; the model stays in
            eval mode, so results are unchanged).
        autocast_dtype: None (no autocast), torch.bfloat16/"bf16" or torch.float16/"fp16".
            Tokens stay fp32 master weights and are cast where they are inserted.
        guidance: Flux dev's distilled guidance value when the cond has no "guidance" (default
            3.5); refused for models without a guidance embedding (UNets, SD3, Flux schnell).
    """

    def __init__(self, denoiser, prediction: str | None = None, alphas_cumprod: torch.Tensor | None = None,
                 extra_cond_fn=None, gradient_checkpointing: bool = False, autocast_dtype=None,
                 guidance: float | None = None):
        self.family = model_family(denoiser)
        native = PREDICTIONS[self.family]
        prediction = prediction or native
        if prediction != native and not (self.family == UNET and prediction == "v"):
            raise ValueError(f"{type(denoiser).__name__} predicts {native!r}; prediction={prediction!r} "
                             "is not supported by this backend")
        if isinstance(autocast_dtype, str) or autocast_dtype is None:
            if autocast_dtype not in AUTOCAST:
                raise ValueError(f"autocast_dtype must be one of {sorted(k for k in AUTOCAST if k)} or None, "
                                 f"got {autocast_dtype!r}")
            autocast_dtype = AUTOCAST[autocast_dtype]
        elif autocast_dtype not in (torch.bfloat16, torch.float16):
            raise ValueError(f"autocast_dtype must be torch.bfloat16, torch.float16 or None, got {autocast_dtype}")
        if prediction in ("epsilon", "v"):
            alphas_cumprod = scaled_linear_alphas_cumprod() if alphas_cumprod is None else alphas_cumprod
            if alphas_cumprod.ndim != 1 or alphas_cumprod.shape[0] != 1000:
                raise ValueError(f"alphas_cumprod must have shape (1000,), got {tuple(alphas_cumprod.shape)}")
        elif alphas_cumprod is not None:
            raise ValueError("alphas_cumprod only applies to epsilon and v models")

        self.denoiser = denoiser.eval().requires_grad_(False)
        self.prediction = prediction
        self.alphas_cumprod = alphas_cumprod
        self.extra_cond_fn = extra_cond_fn
        self.autocast_dtype = autocast_dtype
        param = next(denoiser.parameters())
        self.device, self.dtype = param.device, param.dtype
        self._injectors: dict = {}
        self.sdxl = self.family == UNET and getattr(denoiser.config, "addition_embed_type", None) == "text_time"
        self.flux = is_flux(denoiser)
        if guidance is not None and not (self.flux and denoiser.config.guidance_embeds):
            raise ValueError(f"guidance={guidance} only applies to Flux dev (a guidance-distilled model); "
                             f"{type(denoiser).__name__} has no guidance embedding")
        self.guidance = float(FLUX_GUIDANCE if guidance is None else guidance)
        if gradient_checkpointing:
            self._enable_checkpointing()

    @property
    def compute_dtype(self) -> torch.dtype:
        """The dtype the denoiser computes in: the autocast dtype, else the weights'."""
        return self.autocast_dtype or self.dtype

    # --- forward process -----------------------------------------------------------------
    def noisy(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """z_t: DDIM add_noise (epsilon) or (1 - t/1000) x0 + t/1000 noise (flow)."""
        if self.prediction in ("epsilon", "v"):
            return eps_noisy(self.alphas_cumprod, x0, noise, t)
        return flow_noisy(x0, noise, t)

    def target(self, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor) -> torch.Tensor:
        """The regression target: noise (epsilon) or noise - x0 (flow)."""
        noise = noise.expand_as(x0)
        if self.prediction == "v":  # v = sqrt(abar) eps - sqrt(1 - abar) x0 (diffusers' get_velocity)
            abar = self.alphas_cumprod.to(x0.device)[torch.as_tensor(t).reshape(-1).to(x0.device).long()]
            abar = abar.to(x0.dtype).view(-1, *([1] * (x0.ndim - 1)))
            return abar.sqrt() * noise - (1 - abar).sqrt() * x0
        return noise if self.prediction == "epsilon" else noise - x0

    # --- prediction ----------------------------------------------------------------------
    def predict(self, z_t: torch.Tensor, t: torch.Tensor, cond: Cond, tokens: SoftTokens | None,
                set_index=0) -> torch.Tensor:
        """The denoiser's prediction (N,C,h,w) in fp32; tokens=None runs the plain model."""
        n = z_t.shape[0]
        t = torch.as_tensor(t, device=self.device).reshape(-1)
        t = t.expand(n) if t.numel() == 1 else t
        if t.shape[0] != n:
            raise ValueError(f"t has {t.shape[0]} entries for a batch of {n}")
        kwargs = self._model_inputs(z_t, t, cond)
        use = self.use_tokens(tokens, set_index) if tokens is not None else contextlib.nullcontext()
        with use, self._autocast():
            out = self.denoiser(**kwargs, return_dict=False)[0]
        if self.flux:
            out = _flux_unpack(out, z_t.shape)
        return out.float()

    def use_tokens(self, tokens: SoftTokens, set_index=0):
        """Context manager: plain calls of the denoiser inside it (e.g. a sampler) use the tokens."""
        return self._injector(tokens).using(tokens, set_index)

    def remove(self):
        """Uninstall every token hook: the denoiser is exactly as before."""
        for inj in self._injectors.values():
            inj.remove()
        self._injectors = {}

    # --- internals -----------------------------------------------------------------------
    def _model_inputs(self, z_t, t, cond: Cond) -> dict:
        n = z_t.shape[0]
        need = ["context"] + (["text_embeds", "time_ids"] if self.sdxl else []) + \
               (["pooled"] if self.family != UNET else [])
        missing = [k for k in need if k not in cond]
        if missing:
            raise ValueError(f"conditioning lacks {missing} (has {sorted(cond)}); "
                             f"{type(self.denoiser).__name__} needs {need}")
        bad = [k for k in need if cond[k].shape[0] != n]
        if bad:
            raise ValueError(f"conditioning rows {[(k, cond[k].shape[0]) for k in bad]} do not match the batch of {n}")
        cast = lambda x: x.to(self.device, self.dtype)  # noqa: E731
        if self.family == UNET:
            kwargs = {"sample": cast(z_t), "timestep": t, "encoder_hidden_states": cast(cond["context"])}
            if self.sdxl:
                kwargs["added_cond_kwargs"] = {"text_embeds": cast(cond["text_embeds"]),
                                               "time_ids": cast(cond["time_ids"])}
        elif self.flux:
            img, img_ids = _flux_pack(cast(z_t))
            kwargs = {"hidden_states": img, "timestep": cast(t) / 1000.0, "img_ids": img_ids,
                      "txt_ids": torch.zeros(cond["context"].shape[1], 3, device=self.device, dtype=self.dtype),
                      "encoder_hidden_states": cast(cond["context"]), "pooled_projections": cast(cond["pooled"])}
            if self.denoiser.config.guidance_embeds:
                g = cond.get("guidance")
                kwargs["guidance"] = (torch.full((n,), self.guidance, device=self.device, dtype=self.dtype)
                                      if g is None else cast(torch.as_tensor(g)).reshape(-1).expand(n))
        else:
            kwargs = {"hidden_states": cast(z_t), "timestep": t, "encoder_hidden_states": cast(cond["context"]),
                      "pooled_projections": cast(cond["pooled"])}
        if self.extra_cond_fn is not None:
            kwargs.update(self.extra_cond_fn(z_t, t, cond))
        return kwargs

    def _autocast(self):
        if self.autocast_dtype is None:
            return contextlib.nullcontext()
        return torch.autocast(self.device.type, dtype=self.autocast_dtype)

    def _injector(self, tokens: SoftTokens) -> TokenInjector:
        inj = self._injectors.get(tokens.layout)
        if inj is None:
            inj = TokenInjector(self.denoiser, tokens)
            inj.enabled = False  # only active inside predict's `using`
            self._injectors[tokens.layout] = inj
        return inj

    def _enable_checkpointing(self):
        params = inspect.signature(self.denoiser.enable_gradient_checkpointing).parameters
        if "gradient_checkpointing_func" not in params:
            raise ValueError("gradient checkpointing of the frozen backbone needs diffusers >= 0.32")
        self.denoiser.enable_gradient_checkpointing(gradient_checkpointing_func=self._checkpoint)

    def _checkpoint(self, module, *args):
        """torch checkpoint of one block that replays the injectors' state when recomputing.

        The recompute runs during backward, after ``predict`` has left its ``using`` block, so
        the tokens, set index, timestep and token cache seen by the block's hooks are restored
        to what they were in the forward pass.
        """
        state = [(inj, inj.snapshot()) for inj in self._injectors.values()]
        calls = [0]

        def run(*a):
            calls[0] += 1
            if calls[0] == 1:  # the forward pass itself
                return module(*a)
            saved = [(inj, inj.snapshot()) for inj, _ in state]
            try:
                for inj, snap in state:
                    inj.restore(snap)
                return module(*a)
            finally:
                for inj, snap in saved:
                    inj.restore(snap)

        return torch.utils.checkpoint.checkpoint(run, *args, use_reentrant=False)

    # --- construction from local files ---------------------------------------------------
    @classmethod
    def from_local(cls, path, config=None, dtype: torch.dtype | None = None, **kwargs) -> "DiffusersBackend":
        """A backend for local weights (see ``load_denoiser``); an epsilon model in a pipeline
        folder takes its noise schedule from the folder's scheduler config."""
        denoiser = load_denoiser(path, config=config, dtype=dtype)
        if model_family(denoiser) == UNET and "alphas_cumprod" not in kwargs:
            kwargs["alphas_cumprod"] = schedule_from_folder(config if Path(path).is_file() else path)
        if model_family(denoiser) == UNET and "prediction" not in kwargs:
            kwargs["prediction"] = prediction_from_folder(config if Path(path).is_file() else path)
        return cls(denoiser, **kwargs)


# --- helpers ------------------------------------------------------------------------------

def sdxl_time_ids(latent_h: int, latent_w: int, n: int = 1) -> torch.Tensor:
    """SDXL add_time_ids (H, W, 0, 0, H, W) for latents of this size (pixels = 8x), (n, 6)."""
    h, w = 8 * latent_h, 8 * latent_w
    return torch.tensor([[h, w, 0, 0, h, w]], dtype=torch.float32).expand(n, -1).clone()


def schedule_from_folder(path) -> torch.Tensor | None:
    """alpha-bar from a pipeline folder's scheduler/scheduler_config.json, or None if there is none.

    Supports the DDPM 'scaled_linear' and 'linear' beta schedules with epsilon or v prediction,
    and ``rescale_betas_zero_snr`` (zero terminal SNR, as some SDXL v-prediction derivatives use).
    """
    f = Path(path) / "scheduler" / "scheduler_config.json"
    if not f.is_file():
        return None
    cfg = json.loads(f.read_text())
    prediction_from_folder(path)  # refuses other prediction types
    abar = _beta_schedule(cfg, f)
    return _zero_terminal_snr(abar) if cfg.get("rescale_betas_zero_snr") else abar


def prediction_from_folder(path) -> str:
    """"epsilon" or "v": a pipeline folder's scheduler ``prediction_type`` (epsilon without a config)."""
    f = Path(path) / "scheduler" / "scheduler_config.json"
    kind = json.loads(f.read_text()).get("prediction_type", "epsilon") if f.is_file() else "epsilon"
    if kind not in ("epsilon", "v_prediction"):
        raise ValueError(f"{f}: prediction_type {kind!r} is not supported (epsilon or v_prediction)")
    return "v" if kind == "v_prediction" else "epsilon"


def _zero_terminal_snr(abar: torch.Tensor) -> torch.Tensor:
    """Rescale alpha-bar to zero terminal SNR (Lin et al. 2024, Algorithm 1): sqrt(abar) is shifted so
    the last step is 0 and scaled so the first is unchanged."""
    r = abar.sqrt()
    first, last = r[0].clone(), r[-1].clone()
    return ((r - last) * first / (first - last)) ** 2


def _beta_schedule(cfg: dict, f) -> torch.Tensor:
    n = int(cfg.get("num_train_timesteps", 1000))
    if n != 1000:
        raise ValueError(f"{f}: num_train_timesteps={n}; soft-token training assumes 1000")
    lo, hi, kind = float(cfg.get("beta_start", 0.00085)), float(cfg.get("beta_end", 0.012)), cfg.get("beta_schedule")
    if kind == "scaled_linear":
        return scaled_linear_alphas_cumprod(lo, hi, n)
    if kind == "linear":
        return torch.cumprod(1.0 - torch.linspace(lo, hi, n, dtype=torch.float64), dim=0)
    raise ValueError(f"{f}: beta_schedule {kind!r} is not supported (scaled_linear or linear)")


def load_denoiser(path, config=None, dtype: torch.dtype | None = None):
    """Load a frozen diffusers denoiser from local files only (never the network).

    path may be:
    - a diffusers pipeline folder (model_index.json): its unet/ or transformer/ subfolder;
    - a model folder: config.json + diffusion_pytorch_model*.safetensors (or .bin);
    - a single .safetensors file (diffusers or original key names); then ``config`` must be a
      local model or pipeline folder holding the model's config.json.
    Raises ValueError when the weights are not local or the folder is not a supported model.
    """
    p = Path(path)
    if not p.exists():
        raise ValueError(f"{path}: no such local file or folder. load_denoiser reads local weights only and "
                         "never downloads; download the model first (e.g. `huggingface-cli download <repo> "
                         "--local-dir <folder>`) and pass that folder.")
    if p.is_dir():
        folder = _model_folder(p)
        model_cls = _model_class(folder / "config.json")
        variant = _weights_variant(folder)
        try:
            model = model_cls.from_pretrained(str(folder), local_files_only=True, torch_dtype=dtype, variant=variant)
        except OSError as e:
            raise ValueError(f"{folder}: could not load the denoiser from local files: {e}") from e
    else:
        if p.suffix != ".safetensors":
            raise ValueError(f"{p}: a single-file denoiser must be a .safetensors file")
        if config is None:
            raise ValueError(f"{p}: a single .safetensors file needs config=, a local model folder with "
                             "config.json or a pipeline folder with unet/ or transformer/")
        c = Path(config)
        if not c.is_dir():
            raise ValueError(f"config {config}: no such local folder (it must hold config.json, "
                             "or be a pipeline folder)")
        folder = _model_folder(c)
        model_cls = _model_class(folder / "config.json")
        sub = folder.name if folder != c else None
        try:
            model = model_cls.from_single_file(str(p), config=str(c), subfolder=sub, local_files_only=True,
                                               torch_dtype=dtype)
        except OSError as e:
            raise ValueError(f"{p}: could not load with config {config}: {e}") from e
    return model.eval().requires_grad_(False)


def _model_folder(p: Path) -> Path:
    """The folder holding the denoiser's config.json: p itself or its unet/ or transformer/."""
    if (p / "config.json").is_file() and not (p / "model_index.json").is_file():
        return p
    for sub in ("transformer", "unet"):
        if (p / sub / "config.json").is_file():
            return p / sub
    raise ValueError(f"{p}: neither a diffusers model folder (config.json) nor a pipeline folder with "
                     "unet/ or transformer/")


def _weights_variant(folder: Path) -> str | None:
    """None for plain diffusion_pytorch_model weights, else the variant of the only weights
    present (e.g. "fp16" for diffusion_pytorch_model.fp16.safetensors)."""
    names = [f.name for f in folder.glob("diffusion_pytorch_model*")]
    plain = {"diffusion_pytorch_model.safetensors", "diffusion_pytorch_model.bin",
             "diffusion_pytorch_model.safetensors.index.json", "diffusion_pytorch_model.bin.index.json"}
    if plain & set(names):
        return None
    variants = sorted({m.group(1) for n in names
                       for m in [re.fullmatch(r"diffusion_pytorch_model(?:\.safetensors\.index|\.bin\.index)?\.(\w+)"
                                              r"\.(?:safetensors|bin|json)", n)] if m})
    if not variants:
        raise ValueError(f"{folder}: no diffusion_pytorch_model*.safetensors (or .bin) weights in this folder")
    if len(variants) > 1:
        raise ValueError(f"{folder}: several weight variants {variants}; keep one or add the plain weights")
    return variants[0]


def _model_class(config_file: Path):
    import diffusers

    name = json.loads(config_file.read_text()).get("_class_name")
    if name not in DENOISER_CLASSES:
        raise ValueError(f"{config_file}: model class {name!r} is not supported; expected one of {DENOISER_CLASSES}")
    return getattr(diffusers, name)


def _flux_pack(z: torch.Tensor):
    """(N, C, h, w) latent -> Flux's packed image tokens (N, h/2 * w/2, 4C), channel-major within each
    2x2 patch, and their ids (h/2 * w/2, 3) = (0, row, col)."""
    n, c, h, w = z.shape
    if h % 2 or w % 2:
        raise ValueError(f"Flux latents need even height and width, got {h}x{w}")
    img = z.reshape(n, c, h // 2, 2, w // 2, 2).permute(0, 2, 4, 1, 3, 5).reshape(n, (h // 2) * (w // 2), c * 4)
    rows = torch.arange(h // 2, device=z.device, dtype=z.dtype)
    cols = torch.arange(w // 2, device=z.device, dtype=z.dtype)
    ids = torch.stack([torch.zeros(h // 2, w // 2, device=z.device, dtype=z.dtype),
                       rows[:, None].expand(-1, w // 2), cols[None, :].expand(h // 2, -1)], dim=-1)
    return img, ids.reshape(-1, 3)


def _flux_unpack(out: torch.Tensor, shape) -> torch.Tensor:
    """Inverse of _flux_pack for the model output: (N, h/2 * w/2, 4C) -> (N, C, h, w)."""
    n, c, h, w = shape
    return out.reshape(n, h // 2, w // 2, c, 2, 2).permute(0, 3, 1, 4, 2, 5).reshape(n, c, h, w)
