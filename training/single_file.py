"""Single-file Stable Diffusion checkpoints (ComfyUI's models/checkpoints) without ComfyUI.

One ``.safetensors`` file in the original (LDM/SGM/SD3 reference) key layout holds the whole model:

- sd15: ``model.diffusion_model.*`` (UNet), ``first_stage_model.*`` (VAE),
  ``cond_stage_model.transformer.*`` (CLIP-L);
- sdxl: the same UNet/VAE prefixes, ``conditioner.embedders.0.transformer.*`` (CLIP-L) and
  ``conditioner.embedders.1.model.*`` (OpenCLIP bigG);
- sd3: ``model.diffusion_model.joint_blocks.*`` (MMDiT), ``first_stage_model.*``,
  ``text_encoders.{clip_l,clip_g,t5xxl}.transformer.*`` (T5 optional: without it its part of the
  conditioning is zeros, as in diffusers).

``load_single_file`` converts each part with diffusers' single-file converters and LOCAL configs
only (never the network): ``config``, a local diffusers pipeline folder of the model (configs and
tokenizers; a part missing from the file is taken from that folder's weights when it has them), or
else the configs shipped in ``assets/single_file/<arch>/``, written from the public
hyper-parameters of SD1.5, SDXL base 1.0 and SD3 medium. Tokenizer vocabularies are not shipped:
without them the loader stops before reading weights and asks for ``config``.

The encoders are ``SingleFileEncoders``: a ``PipelineEncoders`` whose tokenizers, text encoders
and VAE are already loaded, so the conditioning is computed by exactly the same code as
``Encoders.from_pipeline`` for that architecture. Its cache identity hashes the checkpoint file
(path, size, mtime) and the config files.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from types import SimpleNamespace

import torch

from .encoders import SD3_T5_LENGTH, PipelineEncoders, _fingerprint, _load_text_encoder, _load_tokenizer, detect_arch
from .layouts import ARCH_FAMILY

ASSETS = Path(__file__).resolve().parent / "assets" / "single_file"
D = "model.diffusion_model."
VAE = "first_stage_model."
# key prefix of each part in the file
PARTS = {
    "sd15": {"unet": D, "vae": VAE, "text_encoder": "cond_stage_model.transformer."},
    "sdxl": {"unet": D, "vae": VAE, "text_encoder": "conditioner.embedders.0.transformer.",
             "text_encoder_2": "conditioner.embedders.1.model."},
    "sd3": {"transformer": D, "vae": VAE, "text_encoder": "text_encoders.clip_l.transformer.",
            "text_encoder_2": "text_encoders.clip_g.transformer.",
            "text_encoder_3": "text_encoders.t5xxl.transformer."},
}
SHIPPED_NAMES = {"sd15": "Stable Diffusion 1.5", "sdxl": "SDXL base 1.0", "sd3": "SD3 medium"}
WEIGHT_FILES = ("*.safetensors", "*.bin")


# --- checks (header only, no weights) -------------------------------------------------------

def read_header(path) -> dict:
    """{key: shape} of a .safetensors checkpoint, read from its header (no weights)."""
    p = Path(path).expanduser()
    if not p.exists():
        raise ValueError(f"checkpoint {p} does not exist")
    if not p.is_file():
        raise ValueError(f"checkpoint {p} is not a file (for a diffusers pipeline folder use --model)")
    if p.suffix.lower() != ".safetensors":
        raise ValueError(f"checkpoint {p} is not a .safetensors file; only safetensors single-file checkpoints "
                         "are read (convert .ckpt/.pt files to .safetensors first)")
    from safetensors import safe_open

    try:
        with safe_open(str(p), framework="pt", device="cpu") as f:
            return {k: tuple(f.get_slice(k).get_shape()) for k in f.keys()}
    except Exception as e:  # safetensors raises its own error types for damaged headers
        raise ValueError(f"checkpoint {p} is not a readable safetensors file: {e}") from e


def detect_checkpoint_arch(path, comfy: bool = False) -> str:
    """The architecture ("sd15", "sdxl" or "sd3") of a single-file checkpoint, from its header's keys and shapes.

    comfy=True (the file goes through ComfyUI's loader) also accepts SD2.x ("sd2"), SD3.5 ("sd35")
    and SDXL v-prediction derivatives ("sdxl", ``v_pred`` key); the diffusers conversion does not.
    """
    return _arch_of(read_header(path), Path(path), comfy)


def _arch_of(shapes: dict, path: Path, comfy: bool = False) -> str:
    keys = shapes.keys()
    has = lambda prefix: any(k.startswith(prefix) for k in keys)  # noqa: E731
    what = None
    if "edm_mean" in shapes or "edm_vpred.sigma_max" in shapes or ("v_pred" in shapes and not comfy):
        what = ("a v-prediction or EDM checkpoint (without ComfyUI only epsilon SD1.5/SDXL and flow SD3 are "
                "supported; v-prediction SDXL trains through ComfyUI)")
    elif D + "joint_blocks.0.context_block.attn.ln_q.weight" in shapes:
        if comfy:
            return _check_in_channels(shapes, D + "x_embedder.proj.weight", 16, "sd35", path)
        what = ("an SD3.5 model (qk-norm); without ComfyUI, SD3.5 trains from a diffusers pipeline folder "
                "(--model)")
    elif has(D + "joint_blocks."):
        return _check_in_channels(shapes, D + "x_embedder.proj.weight", 16, "sd3", path)
    elif has(D + "double_blocks.") or has("double_blocks."):
        what = ("a Flux model; Flux ships as a separate diffusion-model file (models/diffusion_models) with its "
                "text encoders and VAE apart, which this loader does not assemble: train Flux tokens with "
                "ComfyUI's trainer nodes (Load Diffusion Model + DualCLIPLoader), or pass --model a local "
                "diffusers FluxPipeline folder")
    elif has(D + "input_blocks."):
        ctx = _context_dim(shapes)
        if D + "label_emb.0.0.weight" in shapes:  # SDXL-type UNet (size/crop conditioning)
            if has("conditioner.embedders.0.model.") or ctx == 1280:
                what = "an SDXL refiner (only SDXL base-type checkpoints with two text encoders are supported)"
            else:
                return _check_in_channels(shapes, D + "input_blocks.0.0.weight", 4, "sdxl", path)
        elif has("cond_stage_model.model.") or ctx == 1024:
            if comfy:
                return _check_in_channels(shapes, D + "input_blocks.0.0.weight", 4, "sd2", path)
            what = ("a Stable Diffusion 2.x model (OpenCLIP-H text encoder; without ComfyUI, SD2.x trains from a "
                    "diffusers pipeline folder)")
        elif has("cond_stage_model.transformer.") or ctx == 768:
            return _check_in_channels(shapes, D + "input_blocks.0.0.weight", 4, "sd15", path)
        else:
            what = f"a UNet with an unknown text encoder (cross-attention width {ctx})"
    elif has("joint_blocks.") or has("input_blocks."):
        what = "a denoiser-only file (keys without the model.diffusion_model. prefix); a full checkpoint is needed"
    elif any("lora" in k for k in keys):
        what = "a LoRA"
    raise ValueError(f"checkpoint {path}: unknown architecture" + (f", it looks like {what}" if what else "")
                     + ". Supported: SD1.5-, SDXL- and SD3-type single-file checkpoints with the original key "
                     "names (model.diffusion_model.* ..., as in ComfyUI's models/checkpoints)")


def _context_dim(shapes: dict):
    """Cross-attention (text) width of an LDM UNet, or None."""
    for k, shape in shapes.items():
        if k.startswith(D) and k.endswith("attn2.to_k.weight"):
            return shape[1]
    return None


def _check_in_channels(shapes, key, expected, arch, path) -> str:
    if key in shapes and len(shapes[key]) > 1 and shapes[key][1] != expected:
        raise ValueError(f"checkpoint {path}: a {arch} denoiser with {shapes[key][1]} input channels (inpainting or "
                         f"another conditioned variant); soft-token training needs the plain {expected}-channel model")
    return arch


# --- loading --------------------------------------------------------------------------------

def load_single_file(path, *, config=None, arch=None, device="cpu", dtype=torch.float32, image_size=512,
                     gradient_checkpointing=False, autocast_dtype=None):
    """(DiffusersBackend, SingleFileEncoders, arch) of a single-file checkpoint, from local files only.

    ``config`` is a local diffusers pipeline folder of the model (configs + tokenizers); None uses
    the shipped configs. Missing file, wrong suffix, unknown architecture, a config that does not
    fit the checkpoint and missing tokenizers raise ValueError before any weight is read.
    """
    if int(image_size) < 8 or int(image_size) % 8:
        raise ValueError(f"image_size must be a positive multiple of 8, got {image_size}")
    plan = _plan(path, config, arch)
    device = torch.device(device)

    from .diffusers_backend import DiffusersBackend, schedule_from_folder

    tokenizers = {t: _load_tokenizer(plan.root, t, plan.index) for t in plan.tokenizers}
    denoiser = _load_diffusers_part(plan, plan.denoiser, dtype).to(device)
    kwargs = {}
    if plan.arch != "sd3":
        schedule = schedule_from_folder(plan.root)  # the model's own noise schedule
        if schedule is not None:
            kwargs["alphas_cumprod"] = schedule
    backend = DiffusersBackend(denoiser, gradient_checkpointing=gradient_checkpointing,
                               autocast_dtype=autocast_dtype, **kwargs)
    encoders = SingleFileEncoders(plan, tokenizers, device=device, dtype=dtype, image_size=image_size)
    return backend, encoders, plan.arch


def _plan(path, config, arch) -> SimpleNamespace:
    """Every check that needs no weights: file, architecture, config folder, parts, tokenizers."""
    path = Path(path).expanduser()
    shapes = read_header(path)
    if arch is None:
        arch = _arch_of(shapes, path)
    elif arch not in ARCH_FAMILY:
        raise ValueError(f"unknown architecture {arch!r}; expected one of {sorted(ARCH_FAMILY)}")
    root = _config_root(config, arch)
    index = json.loads((root / "model_index.json").read_text(encoding="utf-8"))
    in_file, in_folder = [], []
    for part, prefix in PARTS[arch].items():
        if any(k.startswith(prefix) for k in shapes):
            in_file.append(part)
        elif _has_weights(root / part, index.get(part)):
            in_folder.append(part)
        elif part != "text_encoder_3":  # SD3 runs without T5 (zeros), as diffusers does
            where = f" nor in {root}" if config is not None else ""
            raise ValueError(f"checkpoint {path}: the {arch} {part} is not in the file{where} (no {prefix}* keys). "
                             "Use a full checkpoint, or pass --config a local diffusers pipeline folder that holds "
                             f"the {part} weights")
    missing = [f"{p}/config.json" for p in PARTS[arch] if p in in_file and not (root / p / "config.json").is_file()]
    if missing:
        raise ValueError(f"config folder {root} lacks {', '.join(missing)}, which the {arch} checkpoint needs")
    _check_fits(shapes, arch, root, path, config is None, in_file)
    text = [p for p in in_file + in_folder if p.startswith("text_encoder")]
    tokenizers = [p.replace("text_encoder", "tokenizer") for p in sorted(text)]
    no_vocab = [t for t in tokenizers if not _has_vocab(root / t)]
    if no_vocab:
        if config is None:
            hint = (f"the configs shipped for {arch} in {root} hold no tokenizer vocabularies (they are too large to "
                    "ship, and nothing is downloaded). Pass --config a local diffusers pipeline folder of "
                    f"{SHIPPED_NAMES[arch]} (or of this model): its model_index.json, config files and "
                    f"{', '.join(t + '/' for t in tokenizers)} are enough, the weights are not needed")
        else:
            hint = (f"config folder {root} has no tokenizer vocabulary in {', '.join(no_vocab)}/ (vocab.json + "
                    "merges.txt for CLIP, spiece.model for T5, or tokenizer.json). Pass --config a complete local "
                    "diffusers pipeline folder of this model")
        raise ValueError(f"checkpoint {path}: {hint}")
    denoiser = "transformer" if arch == "sd3" else "unet"
    return SimpleNamespace(path=path, arch=arch, root=root, index=index, in_file=in_file, in_folder=in_folder,
                           tokenizers=tokenizers, denoiser=denoiser)


def _config_root(config, arch) -> Path:
    if config is None:
        return ASSETS / arch
    root = Path(config).expanduser()
    if not (root / "model_index.json").is_file():
        raise ValueError(f"config {root} is not a local diffusers pipeline folder (no model_index.json); pass the "
                         f"folder of the {arch} pipeline with its configs and tokenizers")
    index = json.loads((root / "model_index.json").read_text(encoding="utf-8"))
    their = detect_arch(index, root)
    if their != arch:
        raise ValueError(f"config {root} is a {their} pipeline but the checkpoint is {arch}")
    return root.resolve()


def _has_weights(folder: Path, spec) -> bool:
    if isinstance(spec, (list, tuple)) and (len(spec) < 2 or spec[1] is None):
        return False
    return folder.is_dir() and any(f for pattern in WEIGHT_FILES for f in folder.glob(pattern))


def _has_vocab(folder: Path) -> bool:
    files = {f.name for f in folder.glob("*")} if folder.is_dir() else set()
    return "tokenizer.json" in files or "spiece.model" in files or {"vocab.json", "merges.txt"} <= files


def _check_fits(shapes, arch, root, path, shipped, in_file):
    """ValueError unless the checkpoint's telltale shapes match the config folder."""
    cfg = {p: json.loads((root / p / "config.json").read_text(encoding="utf-8")) for p in in_file}
    checks = []  # (part, what, file value, config value); None on either side = not checked
    if "unet" in cfg:
        u = cfg["unet"]
        w = shapes.get(D + "input_blocks.0.0.weight")
        checks.append(("unet", "base width", w and w[0], (u.get("block_out_channels") or [None])[0]))
        checks.append(("unet", "cross-attention width", _context_dim(shapes), u.get("cross_attention_dim")))
    if "transformer" in cfg:
        t = cfg["transformer"]
        w = shapes.get(D + "x_embedder.proj.weight")
        heads, head_dim = t.get("num_attention_heads"), t.get("attention_head_dim")
        checks.append(("transformer", "width", w and w[0], heads and head_dim and heads * head_dim))
        blocks = {int(k[len(D):].split(".")[1]) for k in shapes if k.startswith(D + "joint_blocks.")}
        checks.append(("transformer", "joint blocks", len(blocks), t.get("num_layers")))
        pos, size = shapes.get(D + "pos_embed"), t.get("pos_embed_max_size")
        checks.append(("transformer", "position table", pos and pos[1], size and size ** 2))
        dual = sum(1 for b in blocks if D + f"joint_blocks.{b}.x_block.attn2.qkv.weight" in shapes)
        checks.append(("transformer", "dual-attention blocks", dual, len(t.get("dual_attention_layers") or ())))
        qk = any(k.startswith(D + "joint_blocks.") and ".ln_q." in k for k in shapes)
        checks.append(("transformer", "q/k norm", qk, bool(t.get("qk_norm"))))
    if "vae" in cfg:
        w = shapes.get(VAE + "encoder.conv_out.weight")
        if w:
            checks.append(("vae", "latent channels", w[0] // 2, cfg["vae"].get("latent_channels", 4)))
    for part in ("text_encoder", "text_encoder_2", "text_encoder_3"):
        if part in cfg:
            prefix = PARTS[arch][part]
            emb = [s for k, s in shapes.items() if k.startswith(prefix) and
                   k.endswith(("token_embedding.weight", "shared.weight"))]
            if emb:
                want = cfg[part].get("hidden_size", cfg[part].get("d_model"))
                checks.append((part, "width", emb[0][1], want))
    bad = [f"{part} {what}: file {a}, config {b}" for part, what, a, b in checks
           if a is not None and b is not None and a != b]
    if bad:
        whose = (f"the configs shipped for {SHIPPED_NAMES[arch]} ({root})" if shipped else f"config folder {root}")
        raise ValueError(f"checkpoint {path} does not fit {whose}: {'; '.join(bad)}. It is another variant of "
                         f"{arch}: pass --config a local diffusers pipeline folder of exactly this model")


def _read(path: Path, prefix: str, strip: bool = False) -> dict:
    """The tensors whose keys start with ``prefix`` (prefix removed when ``strip``)."""
    from safetensors import safe_open

    with safe_open(str(path), framework="pt", device="cpu") as f:
        return {(k[len(prefix):] if strip else k): f.get_tensor(k) for k in f.keys() if k.startswith(prefix)}


def _load_diffusers_part(plan, part: str, dtype):
    """Denoiser or VAE: diffusers' ``from_single_file`` on the part's keys with the local config."""
    import diffusers

    name = json.loads((plan.root / part / "config.json").read_text(encoding="utf-8")).get("_class_name")
    cls = getattr(diffusers, str(name), None)
    if cls is None or not hasattr(cls, "from_single_file"):
        raise ValueError(f"{plan.root / part}/config.json: class {name!r} cannot be loaded from a single file")
    if part in plan.in_folder:
        return cls.from_pretrained(plan.root / part, local_files_only=True, torch_dtype=dtype)
    state = _read(plan.path, PARTS[plan.arch][part])
    try:
        model = cls.from_single_file(state, config=str(plan.root), subfolder=part, local_files_only=True,
                                     torch_dtype=dtype)
    except Exception as e:  # diffusers' converters raise KeyError/RuntimeError/... on keys that do not fit
        raise ValueError(f"checkpoint {plan.path}: could not convert its {part} with the config in {plan.root}: "
                         f"{e}") from e
    return model.eval().requires_grad_(False)


def _load_text_part(plan, part: str, dtype, device):
    """A transformers text encoder from the checkpoint's keys (converted to transformers names)."""
    import transformers

    if part in plan.in_folder:
        return _load_text_encoder(plan.root, part, plan.index, dtype, device)
    cls_name = (plan.index.get(part) or [None, None])[1]
    cls = getattr(transformers, str(cls_name), None)
    if cls is None:
        raise ValueError(f"{plan.root}/model_index.json: unknown text encoder class {cls_name!r} for {part}")
    cfg = cls.config_class.from_pretrained(plan.root / part, local_files_only=True)
    prefix = PARTS[plan.arch][part]
    if plan.arch == "sdxl" and part == "text_encoder_2":  # OpenCLIP layout -> transformers
        from diffusers.loaders.single_file_utils import convert_open_clip_checkpoint

        state = convert_open_clip_checkpoint(SimpleNamespace(config=cfg), _read(plan.path, prefix), prefix=prefix)
    else:
        state = _read(plan.path, prefix, strip=True)
    if plan.arch == "sd3" and part == "text_encoder":
        # SD3's CLIP-L pooled output is not projected (identity), as in diffusers' and ComfyUI's loaders
        state["text_projection.weight"] = torch.eye(cfg.hidden_size)
    model, info = cls.from_pretrained(None, config=cfg, state_dict=state, dtype=dtype, output_loading_info=True)
    missing = sorted(set(info.get("missing_keys") or ()) & {n for n, _ in model.named_parameters()})
    mismatched = sorted(info.get("mismatched_keys") or ())
    if missing or mismatched:
        raise ValueError(f"checkpoint {plan.path}: its {part} ({prefix}*) does not fit {cls_name} of {plan.root}: "
                         f"{len(missing)} missing weight(s) {missing[:3]}, {len(mismatched)} of another shape "
                         f"{mismatched[:3]}")
    return model.to(device).eval().requires_grad_(False)


class SingleFileEncoders(PipelineEncoders):
    """``PipelineEncoders`` over the text encoders, tokenizers and VAE of a single-file checkpoint.

    Only construction differs: the parts come from the checkpoint (converted) instead of a pipeline
    folder; encoding, null text and latents are PipelineEncoders' own code.
    """

    def __init__(self, plan, tokenizers: dict, device="cpu", dtype=torch.float32, image_size=512,
                 t5_max_length=SD3_T5_LENGTH, sample=True):
        """``plan`` is ``_plan``'s result; ``tokenizers`` maps tokenizer part names to loaded tokenizers."""
        self.arch, self.root = plan.arch, plan.root
        self.device, self.dtype = torch.device(device), dtype
        self.image_size, self.t5_max_length = int(image_size), int(t5_max_length)
        self.sample = sample
        self.parts = dict(tokenizers)
        for tok in tokenizers:
            part = tok.replace("tokenizer", "text_encoder")
            self.parts[part] = _load_text_part(plan, part, dtype, self.device)
        self.has_t5 = "text_encoder_3" in self.parts
        self.t5_width = self._t5_width(plan.root)

        vcfg = json.loads((plan.root / "vae" / "config.json").read_text(encoding="utf-8"))
        vae_dtype = torch.float32 if (dtype == torch.float16 and vcfg.get("force_upcast")) else dtype
        self.vae = _load_diffusers_part(plan, "vae", vae_dtype).to(self.device).eval().requires_grad_(False)
        self.scaling_factor = float(self.vae.config.scaling_factor)
        self.shift_factor = float(self.vae.config.shift_factor or 0.0)

        st = plan.path.stat()
        ckpt = f"{plan.path.resolve()}|{st.st_size}|{st.st_mtime_ns}"
        settings = {"arch": self.arch, "dtype": str(dtype), "ckpt": ckpt}
        if self.arch == "sdxl":
            settings["image_size"] = self.image_size
        if self.arch == "sd3":
            settings.update(t5=self.has_t5, t5_max_length=self.t5_max_length, t5_width=self.t5_width)
        text_folders = [plan.root / p for p in sorted(self.parts)]
        self._text_id = _fingerprint("text", settings, text_folders, plan.root)
        self._image_id = _fingerprint("image", {"dtype": str(vae_dtype), "ckpt": ckpt}, [plan.root / "vae"],
                                      plan.root)
        self._identity = f"{self.arch}-{hashlib.sha256((self._text_id + self._image_id).encode()).hexdigest()[:16]}"
