"""Text and image encoders: captions -> conditioning (a ``Cond``), pixels -> VAE latents.

``Encoders.from_pipeline(path)`` builds them from a LOCAL diffusers pipeline folder (never the
network) and produces exactly the conditioning both official repos feed the denoiser
(ALGORITHMS 0.1, the diffusers ``encode_prompt`` of each pipeline):

- sd15: CLIP-L last hidden state (final LayerNorm applied), 77 tokens: ``{"context": (N,77,768)}``;
  the null (CFG uncond) conditioning is encode("").
- sdxl: penultimate hidden states of CLIP-L and CLIP-G concatenated (N,77,2048) as ``context``;
  CLIP-G's projected pooled output as ``text_embeds`` (N,1280); ``time_ids`` = (H,W,0,0,H,W) of the
  training image size. The null conditioning is all zeros (context and text_embeds; time_ids stay).
- sd3: [CLIP-L || CLIP-G penultimate, zero-padded to the T5 width] (77) ++ T5 last hidden state
  (``t5_max_length``, official 512) as ``context`` (N,589,4096); CLIP-L || CLIP-G pooled as
  ``pooled`` (N,2048). Without T5 (absent from the folder or ``use_t5=False``) its part is zeros,
  as in diffusers. The null conditioning is encode("").
- flux: T5 (``text_encoder_2``) last hidden state, ``t5_max_length`` tokens (default 512 for dev,
  256 for schnell, as the model cards call FluxPipeline) as ``context`` (N,L,4096); CLIP-L's
  (``text_encoder``, CLIPTextModel) pooled output as ``pooled`` (N,768), as diffusers'
  ``FluxPipeline._get_t5_prompt_embeds`` / ``_get_clip_prompt_embeds``. Guidance (dev) is not a
  text feature: the backend adds it. The null conditioning is encode("").

Latents: ``vae.encode(x).latent_dist`` gives mean and std; the scaled latent is
(z - shift_factor) * scaling_factor (shift 0 except SD3). ``encode_images`` SAMPLES from the
distribution by default, as the official training code does (``latent_dist.sample()``);
``sample=False`` uses the mean. ``image_moments`` returns the scaled (mean, std), which the cache
stores so that every access can still draw a fresh sample.

``Encoders(text_fn, image_fn, identity)`` wraps plain callables (the demo's tiny text encoder with
pixel-space "latents"), so the trainer runs one code path for both.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import torch

from .layouts import ARCH_FAMILY

CLIP_LENGTH = 77
SD3_T5_LENGTH = 512  # SR:sampler.py L69-105 (diffusers' pipeline default is 256)
FLUX_T5_LENGTH = {True: 512, False: 256}  # guidance_embeds: dev 512, schnell 256 (model cards)
_HASH_CONTENT_BELOW = 8 << 20  # hash config/tokenizer files by content, weights by size + mtime


class Encoders:
    """Captions -> Cond and pixels -> latents behind one interface, from plain callables.

    ``text_fn(list[str])`` returns a Cond (dict of batch-first tensors) or one tensor (taken as
    ``context``); ``image_fn(pixels)`` returns latents (default: the pixels themselves).
    ``null_fn()`` returns the unconditional Cond (default: ``text_fn([""])``). ``identity`` names
    the encoders' weights and settings; it keys the on-disk cache, so change it whenever they change.
    """

    def __init__(self, text_fn, image_fn=None, identity: str = "", null_fn=None, arch: str | None = None,
                 device=None):
        if not isinstance(identity, str) or not identity.strip():
            raise ValueError("Encoders need a non-empty identity string (it keys the latent/text cache)")
        if not callable(text_fn):
            raise ValueError("text_fn must be callable: list[str] -> Cond or tensor")
        self._text_fn, self._image_fn, self._null_fn = text_fn, image_fn, null_fn
        self._identity = identity
        self.arch = arch
        self.device = torch.device(device) if device is not None else None
        self.sample = False

    @classmethod
    def from_pipeline(cls, path, arch: str | None = None, device="cpu", dtype=torch.float32,
                      image_size: int = 512, t5_max_length: int | None = None, use_t5: bool = True,
                      vae_path=None, vae_dtype=None, sample: bool = True) -> "PipelineEncoders":
        """Encoders of a local diffusers pipeline folder (sd15, sdxl, sd3 or flux; detected when ``arch`` is None).

        ``t5_max_length`` None: 512 (SD3, Flux dev) or 256 (Flux schnell).

        ``image_size`` is the training resolution (SDXL time_ids). ``vae_path`` replaces the
        pipeline's VAE with another local AutoencoderKL folder (the official SDXL runs use
        madebyollin/sdxl-vae-fp16-fix). ``vae_dtype`` defaults to ``dtype``, except that a VAE
        whose config says ``force_upcast`` runs in float32 when ``dtype`` is float16.
        """
        return PipelineEncoders(path, arch, device, dtype, image_size, t5_max_length, use_t5, vae_path,
                                vae_dtype, sample)

    # --- the interface used by the cache and the trainer ---
    def encode_text(self, prompts) -> dict:
        """Conditioning for a list of captions: a Cond of (N, ...) tensors."""
        prompts = _as_prompts(prompts)
        with torch.no_grad():
            return _as_cond(self._text_fn(prompts))

    def null_text(self) -> dict:
        """The unconditional (CFG) conditioning, batch 1."""
        with torch.no_grad():
            return _as_cond(self._null_fn()) if self._null_fn else self.encode_text([""])

    def image_moments(self, pixels: torch.Tensor) -> tuple:
        """(mean, std) of the scaled latents of pixels (N,3,H,W) in [-1,1]; std None = deterministic."""
        with torch.no_grad():
            return (self._image_fn(pixels) if self._image_fn else pixels.clone()), None

    def encode_images(self, pixels: torch.Tensor, generator: torch.Generator | None = None) -> torch.Tensor:
        """Scaled latents of pixels (N,3,H,W) in [-1,1] (a sample when ``self.sample``, else the mean)."""
        return self.latents_from_moments(*self.image_moments(pixels), generator=generator)

    def latents_from_moments(self, mean, std=None, generator: torch.Generator | None = None) -> torch.Tensor:
        """mean + std * noise when sampling (noise from ``generator``), else mean."""
        if std is None or not self.sample:
            return mean
        dev = generator.device if generator is not None else mean.device
        noise = torch.randn(mean.shape, generator=generator, device=dev, dtype=torch.float32)
        return mean + std * noise.to(mean.device, mean.dtype)

    def identity(self) -> str:
        """A string that changes whenever the weights or settings of any encoder change."""
        return self._identity

    def text_identity(self) -> str:
        """Identity of the text side only (text cache key)."""
        return self._identity

    def image_identity(self) -> str:
        """Identity of the image side only (latent cache key)."""
        return self._identity

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.identity()})"


class PipelineEncoders(Encoders):
    """Tokenizers, text encoders and VAE of a local diffusers pipeline folder (see module docstring)."""

    def __init__(self, path, arch=None, device="cpu", dtype=torch.float32, image_size=512,
                 t5_max_length=None, use_t5=True, vae_path=None, vae_dtype=None, sample=True):
        root = _local_pipeline(path)
        index = json.loads((root / "model_index.json").read_text(encoding="utf-8"))
        arch = arch or detect_arch(index, root)
        if arch not in ARCH_FAMILY:
            raise ValueError(f"unknown architecture {arch!r}; expected one of {sorted(ARCH_FAMILY)}")
        # SD2.x encodes like SD1.5 (one CLIP, last hidden state; diffusers' SD2 text encoder is already
        # cut to the penultimate OpenCLIP layer), SD3.5 like SD3 (CLIP-L, CLIP-G, T5): self.arch is that
        # encoding convention.
        arch = {"sd2": "sd15", "sd35": "sd3"}.get(arch, arch)
        if int(image_size) < 8 or int(image_size) % 8:
            raise ValueError(f"image_size must be a positive multiple of 8, got {image_size}")
        if t5_max_length is None:
            dev = bool(_denoiser_config(root, "transformer").get("guidance_embeds", True))
            t5_max_length = FLUX_T5_LENGTH[dev] if arch == "flux" else SD3_T5_LENGTH
        if arch in ("sd3", "flux") and int(t5_max_length) < 1:
            raise ValueError(f"t5_max_length must be positive, got {t5_max_length}")
        text_parts = {"sd15": ("tokenizer", "text_encoder"),
                      "sdxl": ("tokenizer", "text_encoder", "tokenizer_2", "text_encoder_2"),
                      "sd3": ("tokenizer", "text_encoder", "tokenizer_2", "text_encoder_2"),
                      "flux": ("tokenizer", "text_encoder", "tokenizer_2", "text_encoder_2")}[arch]
        if arch == "sd3" and use_t5 and _present(index, root, "text_encoder_3"):
            text_parts += ("tokenizer_3", "text_encoder_3")
        for part in text_parts:
            if not _present(index, root, part):
                raise ValueError(f"{root} has no usable {part!r} folder, which {arch} needs")
        vae_root = _local_vae(vae_path) if vae_path is not None else root / "vae"
        if not (vae_root / "config.json").is_file():
            raise ValueError(f"no VAE config at {vae_root}; pass vae_path= a local AutoencoderKL folder")

        self.arch, self.root = arch, root
        self.device, self.dtype = torch.device(device), dtype
        self.image_size, self.t5_max_length = int(image_size), int(t5_max_length)
        self.sample = sample
        self.parts = {}
        for part in text_parts:
            if part.startswith("tokenizer"):
                self.parts[part] = _load_tokenizer(root, part, index)
            else:
                self.parts[part] = _load_text_encoder(root, part, index, dtype, self.device)
        self.has_t5 = "text_encoder" + self._t5_suffix in self.parts
        self.t5_width = self._t5_width(root)

        from diffusers import AutoencoderKL

        vcfg = json.loads((vae_root / "config.json").read_text(encoding="utf-8"))
        if vae_dtype is None:
            vae_dtype = torch.float32 if (dtype == torch.float16 and vcfg.get("force_upcast")) else dtype
        self.vae = AutoencoderKL.from_pretrained(vae_root, local_files_only=True, torch_dtype=vae_dtype)
        self.vae.to(self.device).eval().requires_grad_(False)
        self.scaling_factor = float(self.vae.config.scaling_factor)
        self.shift_factor = float(self.vae.config.shift_factor or 0.0)

        settings = {"arch": arch, "dtype": str(dtype)}
        if arch == "sdxl":
            settings["image_size"] = self.image_size
        if arch in ("sd3", "flux"):
            settings.update(t5=self.has_t5, t5_max_length=self.t5_max_length, t5_width=self.t5_width)
        self._text_id = _fingerprint("text", settings, [root / p for p in text_parts], root)
        self._image_id = _fingerprint("image", {"dtype": str(vae_dtype)}, [vae_root], root)
        self._identity = f"{arch}-{hashlib.sha256((self._text_id + self._image_id).encode()).hexdigest()[:16]}"

    @property
    def _t5_suffix(self) -> str:
        """T5's part suffix: text_encoder_2 in Flux, text_encoder_3 in SD3."""
        return "_2" if self.arch == "flux" else "_3"

    def _t5_width(self, root) -> int:
        if self.has_t5:
            return int(self.parts["text_encoder" + self._t5_suffix].config.d_model)
        cfg = root / "transformer" / "config.json"
        if cfg.is_file():  # diffusers zero-fills T5 with the transformer's joint_attention_dim
            return int(json.loads(cfg.read_text(encoding="utf-8")).get("joint_attention_dim", 4096))
        return 4096

    # --- text ---
    def _clip(self, prompts, n: str, penultimate: bool):
        """(hidden states (N,77,d), pooled-or-None) of CLIP encoder ``n`` ("" or "_2")."""
        tok, enc = self.parts["tokenizer" + n], self.parts["text_encoder" + n]
        ids = tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True,
                  return_tensors="pt").input_ids.to(self.device)
        out = enc(ids, output_hidden_states=penultimate)
        if not penultimate:
            return out[0], None
        pooled = out[0] if out[0].ndim == 2 else None  # text_embeds of CLIPTextModelWithProjection
        return out.hidden_states[-2], pooled

    def _t5(self, prompts):
        n = len(prompts)
        if not self.has_t5:
            return torch.zeros(n, self.t5_max_length, self.t5_width, device=self.device, dtype=self.dtype)
        tok, enc = self.parts["tokenizer" + self._t5_suffix], self.parts["text_encoder" + self._t5_suffix]
        ids = tok(prompts, padding="max_length", max_length=self.t5_max_length, truncation=True,
                  add_special_tokens=True, return_tensors="pt").input_ids.to(self.device)
        return enc(ids)[0]

    def encode_text(self, prompts) -> dict:
        prompts = _as_prompts(prompts)
        with torch.no_grad():
            if self.arch == "sd15":
                return {"context": self._clip(prompts, "", penultimate=False)[0]}
            if self.arch == "sdxl":
                h1, _ = self._clip(prompts, "", penultimate=True)
                h2, pooled = self._clip(prompts, "_2", penultimate=True)
                if pooled is None:
                    raise ValueError("SDXL text_encoder_2 must be a CLIPTextModelWithProjection (pooled output)")
                s = self.image_size
                time_ids = torch.tensor([[s, s, 0, 0, s, s]], device=self.device, dtype=h1.dtype)
                return {"context": torch.cat([h1, h2], dim=-1), "text_embeds": pooled,
                        "time_ids": time_ids.repeat(len(prompts), 1)}
            if self.arch == "flux":  # FluxPipeline: CLIPTextModel's pooler_output, T5's last hidden state
                tok, enc = self.parts["tokenizer"], self.parts["text_encoder"]
                ids = tok(prompts, padding="max_length", max_length=tok.model_max_length, truncation=True,
                          return_tensors="pt").input_ids.to(self.device)
                pooled = getattr(enc(ids, output_hidden_states=False), "pooler_output", None)
                if pooled is None:
                    raise ValueError("Flux's text_encoder must be a CLIPTextModel (pooled output)")
                return {"context": self._t5(prompts), "pooled": pooled}
            h1, p1 = self._clip(prompts, "", penultimate=True)
            h2, p2 = self._clip(prompts, "_2", penultimate=True)
            if p1 is None or p2 is None:
                raise ValueError("SD3 text encoders 1 and 2 must be CLIPTextModelWithProjection (pooled outputs)")
            t5 = self._t5(prompts)
            clip = torch.cat([h1, h2], dim=-1)
            if clip.shape[-1] > t5.shape[-1]:
                raise ValueError(f"CLIP width {clip.shape[-1]} exceeds the T5 width {t5.shape[-1]}")
            clip = torch.nn.functional.pad(clip, (0, t5.shape[-1] - clip.shape[-1]))
            return {"context": torch.cat([clip, t5.to(clip.dtype)], dim=-2), "pooled": torch.cat([p1, p2], dim=-1)}

    def null_text(self) -> dict:
        if self.arch == "sdxl":  # SR:sampler.py L1039-1040: zeros, not encode("")
            cond = self.encode_text([""])
            return {k: (v if k == "time_ids" else torch.zeros_like(v)) for k, v in cond.items()}
        return self.encode_text([""])

    # --- images ---
    def image_moments(self, pixels: torch.Tensor) -> tuple:
        if pixels.ndim != 4 or pixels.shape[1] != 3:
            raise ValueError(f"pixels must be (N,3,H,W) in [-1,1], got shape {tuple(pixels.shape)}")
        with torch.no_grad():
            dist = self.vae.encode(pixels.to(self.device, self.vae.dtype)).latent_dist
            return (dist.mean - self.shift_factor) * self.scaling_factor, dist.std * self.scaling_factor

    def identity(self) -> str:
        return self._identity

    def text_identity(self) -> str:
        return self._text_id

    def image_identity(self) -> str:
        return self._image_id


# --- helpers -------------------------------------------------------------------------------

def detect_arch(index: dict, root: Path | None = None) -> str:
    """sd15 / sd2 / sdxl / sd3 / sd35 / flux from a pipeline's model_index.json (and, given the folder, the
    denoiser's config.json: SD3.5 has qk-norm, SD2.x a 1024-wide cross-attention)."""
    name = str(index.get("_class_name", ""))
    transformer = index.get("transformer")
    if "Flux" in name or (isinstance(transformer, (list, tuple)) and "Flux" in str(transformer[-1])) \
            or _denoiser_config(root, "transformer").get("_class_name") == "FluxTransformer2DModel":
        return "flux"
    if "StableDiffusion3" in name or "transformer" in index and "text_encoder_2" in index:
        return "sd35" if _denoiser_config(root, "transformer").get("qk_norm") else "sd3"
    if "XL" in name or "text_encoder_2" in index and "unet" in index:
        return "sdxl"
    if "text_encoder" in index and "unet" in index:
        return "sd2" if _denoiser_config(root, "unet").get("cross_attention_dim") == 1024 else "sd15"
    raise ValueError(f"cannot tell the architecture of pipeline {root or ''} ({name or 'no _class_name'}); "
                     f"pass arch= one of {sorted(ARCH_FAMILY)}")


def _denoiser_config(root: Path | None, part: str) -> dict:
    f = Path(root) / part / "config.json" if root is not None else None
    return json.loads(f.read_text(encoding="utf-8")) if f is not None and f.is_file() else {}


def _local_pipeline(path) -> Path:
    root = Path(path).expanduser()
    if not root.is_dir() or not (root / "model_index.json").is_file():
        raise ValueError(f"{path} is not a local diffusers pipeline folder (no model_index.json). Encoders "
                         f"are only loaded from disk, never downloaded: download the pipeline first "
                         f"(e.g. huggingface-cli download <repo> --local-dir <folder>) and pass that folder")
    return root.resolve()


def _local_vae(path) -> Path:
    root = Path(path).expanduser()
    if not (root / "config.json").is_file():
        raise ValueError(f"{path} is not a local AutoencoderKL folder (no config.json); VAEs are never downloaded")
    return root.resolve()


def _present(index: dict, root: Path, part: str) -> bool:
    spec = index.get(part)
    if isinstance(spec, (list, tuple)) and (len(spec) < 2 or spec[1] is None):
        return False
    return (root / part).is_dir()


def _load_tokenizer(root, part, index):
    import transformers

    spec = index.get(part) or [None, None]
    cls = getattr(transformers, str(spec[1]), None) or transformers.AutoTokenizer
    return cls.from_pretrained(root / part, local_files_only=True)


def _load_text_encoder(root, part, index, dtype, device):
    import transformers

    spec = index.get(part) or [None, None]
    cls = getattr(transformers, str(spec[1]), None)
    if cls is None:
        raise ValueError(f"{root / part}: unknown text encoder class {spec[1]!r} in model_index.json")
    model, info = cls.from_pretrained(root / part, local_files_only=True, dtype=dtype, output_loading_info=True)
    missing = sorted(set(info.get("missing_keys") or ()) & {n for n, _ in model.named_parameters()})
    if missing:  # transformers would leave them randomly initialised
        raise ValueError(f"{root / part}: the checkpoint lacks {len(missing)} weight(s) of {spec[1]}, "
                         f"e.g. {missing[:3]}; the folder is incomplete or of another model")
    return model.to(device).eval().requires_grad_(False)


def _fingerprint(kind: str, settings: dict, folders, root: Path) -> str:
    """Hash of settings, the pipeline path, small files' contents and large files' size + mtime."""
    h = hashlib.sha256(json.dumps({"kind": kind, "root": str(root), **settings}, sort_keys=True).encode())
    for folder in folders:
        files = (p for p in Path(folder).rglob("*")
                 if p.is_file() and not any(q.startswith(".") for q in p.relative_to(folder).parts))
        for f in sorted(files):
            st = f.stat()
            h.update(f"{f.resolve()}|{st.st_size}|".encode())
            if st.st_size < _HASH_CONTENT_BELOW:
                h.update(f.read_bytes())
            else:
                h.update(str(st.st_mtime_ns).encode())
    return f"{kind}-{h.hexdigest()[:24]}"


def _as_prompts(prompts) -> list:
    if isinstance(prompts, str):
        return [prompts]
    prompts = list(prompts)
    if not prompts or not all(isinstance(p, str) for p in prompts):
        raise ValueError("prompts must be a non-empty list of strings")
    return prompts


def _as_cond(out) -> dict:
    if isinstance(out, torch.Tensor):
        return {"context": out}
    if not isinstance(out, dict) or not out:
        raise ValueError(f"a text encoder must return a tensor or a non-empty dict of tensors, got {type(out).__name__}")
    return out
