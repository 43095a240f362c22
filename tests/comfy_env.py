"""Test harness for integration tests against a real upstream ComfyUI checkout.

Nothing here imports ComfyUI at module import time (and pytest is never needed):
call ``import_comfy()`` first; it returns False when no ComfyUI is available.

ComfyUI is found via ``$COMFYUI_PATH`` or, when this repo sits at
``ComfyUI/custom_nodes/<pack>``, the ComfyUI root two levels up.

In-process use (``import_comfy``) forces CPU mode: ``comfy.cli_args`` is imported
first (it parses ``[]`` because ``comfy.options.args_parsing`` is False by default),
``args.cpu = True`` is set, and only then is ``comfy.model_management`` imported
(it reads ``args.cpu`` once, at import, to pick the device).

Tiny models (seeded random weights, N(0, 1/fan_in), zero biases, unit norms; nothing downloaded):

* ``tiny_sd15(seed, context_dim)`` - ``comfy.supported_models.SD15`` with a shrunken
  UNet (2 levels, 32/64 channels, 1 transformer per level + middle, 2 heads).
  ``context_dim=2048`` gives a UNet that takes SDXL-width tokens; it is still the
  SD15 class (EPS, 4 latent channels, no pooled/ADM input) - enough for token tests.
* ``tiny_sd3(seed, depth, num_blocks)`` - ``comfy.supported_models.SD3`` MMDiT
  (hidden = 64*depth, heads = depth, ``num_blocks`` joint blocks), context 4096,
  pooled 2048, flow model (shift 3).
* ``tiny_flux(seed, guidance, depth, single)`` - ``comfy.supported_models.Flux`` (dev, guidance
  embedding) or ``FluxSchnell``: hidden 64, 2 heads, ``depth`` double / ``single`` single blocks,
  context 4096, pooled (vec) 768, 16 latent channels.
* ``tiny_clip_sd15`` / ``tiny_clip_sd3`` / ``tiny_clip_flux`` - ``comfy.sd.CLIP`` with ComfyUI's shipped
  tokenizers and shrunken CLIP-L (/-G, optional T5; Flux: CLIP-L + T5) text models (fp16, as ComfyUI
  loads text encoders).
* ``tiny_vae(seed, latent_channels, kind)`` - ``comfy.sd.VAE``: tiny AutoencoderKL ("kl") or TAESD, /8.
* ``tiny_checkpoint(family, seed, inference, loadable)`` - consistent (MODEL, CLIP, VAE) for "sd15"/"sd3",
  built under ``torch.inference_mode()`` by default; ``save_tiny_checkpoint(path, family, seed)`` writes
  a single-file checkpoint that ``comfy.sd.load_checkpoint_guess_config`` detects and loads.
  ``tiny_flux_checkpoint(seed, guidance)`` - the same for Flux.1 (in memory only; not in FAMILIES).

Forward equivalence with diffusers (fp32, same weights, see tests/integration):

* UNet: ``model.diffusion_model(x, t, context=c)`` ==
  ``UNet2DConditionModel(x, t, encoder_hidden_states=c).sample`` (eps).
  ``model.apply_model(x, sigma, c_crossattn=c)`` == ``x - sigma * eps`` where eps is
  the diffusers output at input ``x / sqrt(sigma**2 + 1)`` and
  ``t = model.model_sampling.timestep(sigma)`` (nearest discrete step, 0..999).
* MMDiT: ``model.diffusion_model(x, t, context=c, y=pooled)`` ==
  ``SD3Transformer2DModel(x, c, pooled, t).sample`` (velocity), and
  ``model.apply_model(x, sigma, c_crossattn=c, y=pooled)`` == ``x - sigma * v`` with
  ``t = sigma * 1000`` (no input scaling for flow models).
* Flux.1: ``diffusers_flux(model)`` - FluxTransformer2DModel on the packed latent (the diffusers backend
  packs/unpacks); ``model.apply_model(x, sigma, c_crossattn=c, y=pooled, guidance=g)`` == ``x - sigma * v``.
"""
import atexit
import functools
import json
import os
import shutil
import socket
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request

import torch

REPO_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

# Shrunken SD1.5 UNet (keys as produced by comfy.model_detection for SD1.5).
TINY_SD15_UNET = {
    "use_checkpoint": False, "image_size": 32, "in_channels": 4, "out_channels": 4,
    "model_channels": 32, "channel_mult": [1, 2], "num_res_blocks": [1, 1],
    "transformer_depth": [1, 1], "transformer_depth_output": [1, 1, 1, 1],
    "transformer_depth_middle": 1, "use_spatial_transformer": True, "legacy": False,
    "adm_in_channels": None, "use_linear_in_transformer": False, "context_dim": 768,
    "use_temporal_attention": False, "use_temporal_resblock": False,
}
TINY_SD15_HEADS = 2


# ---------------------------------------------------------------- locating / importing

def find_comfyui():
    """Return the ComfyUI root directory, or None if it cannot be found."""
    def ok(p):
        return p and os.path.isdir(os.path.join(p, "comfy")) and os.path.isfile(os.path.join(p, "main.py"))

    env = os.environ.get("COMFYUI_PATH")
    if env:
        env = os.path.abspath(os.path.expanduser(env))
        return env if ok(env) else None
    # repo at ComfyUI/custom_nodes/<pack>
    up2 = os.path.dirname(os.path.dirname(REPO_ROOT))
    return up2 if ok(up2) else None


_IMPORTED = None


def import_comfy():
    """Put ComfyUI on sys.path, force CPU mode and import the core modules. Returns True/False."""
    global _IMPORTED
    if _IMPORTED is not None:
        return _IMPORTED
    root = find_comfyui()
    if root is None:
        _IMPORTED = False
        return False
    if root in sys.path:
        sys.path.remove(root)
    sys.path.insert(0, root)
    import comfy.options  # noqa: F401  (args_parsing stays False -> parse_args([]))
    import comfy.cli_args
    comfy.cli_args.args.cpu = True  # must happen before comfy.model_management is imported
    if "comfy.model_management" in sys.modules:
        import comfy.model_management as mm
        if mm.cpu_state != mm.CPUState.CPU:
            raise RuntimeError("comfy.model_management was imported before CPU mode was forced")
    import comfy.model_management  # noqa: F401
    import comfy.model_patcher  # noqa: F401
    import comfy.sample  # noqa: F401
    import comfy.samplers  # noqa: F401
    import comfy.supported_models  # noqa: F401
    import comfy.utils  # noqa: F401
    # ComfyUI's top-level `nodes` module, imported now while ComfyUI leads sys.path: pytest later puts
    # this checkout's root first when its directory name is not an identifier (e.g. a clone in
    # custom_nodes/comfyui-soft-tokens), and our `nodes/` package would then shadow it.
    import nodes  # noqa: F401
    if os.path.dirname(os.path.abspath(nodes.__file__)) != os.path.abspath(root):
        raise RuntimeError(f"`import nodes` found {nodes.__file__}, not ComfyUI's nodes.py in {root}")
    _IMPORTED = True
    return True


def _require():
    if not import_comfy():
        raise RuntimeError("ComfyUI not found: set COMFYUI_PATH")


# ---------------------------------------------------------------- tiny models

def sincos_pos_embed_2d(dim, grid_size):
    """2D sin-cos table (1, grid*grid, dim), rows = h-major; first half encodes x, second y."""
    def one(d, pos):
        omega = 1.0 / 10000 ** (torch.arange(d // 2, dtype=torch.float64) / (d / 2.0))
        out = pos.reshape(-1, 1) * omega[None]
        return torch.cat([out.sin(), out.cos()], dim=1)

    p = torch.arange(grid_size, dtype=torch.float64)
    gy, gx = torch.meshgrid(p, p, indexing="ij")
    return torch.cat([one(dim // 2, gx), one(dim // 2, gy)], dim=1).float()[None]


def init_weights(module, seed=0, std=None):
    """Seeded init: N(0, std) for >=2-D weights, zeros for biases, ones for 1-D (norm) weights.

    std=None (default) uses 1/sqrt(fan_in): activations stay O(1), so outputs clearly depend
    on context/timestep/pooled. std=0.02 works too but makes the MMDiT's adaLN modulation
    and context dependence tiny (~1e-4).
    """
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in module.named_parameters():
            if name.endswith("bias"):
                p.zero_()
            elif p.ndim >= 2:
                s = std if std is not None else p[0].numel() ** -0.5
                p.normal_(0.0, s, generator=g)
            else:
                p.fill_(1.0)
    return module


def _patcher(model):
    import comfy.model_management as mm
    import comfy.model_patcher
    return comfy.model_patcher.ModelPatcher(model, load_device=mm.get_torch_device(),
                                            offload_device=mm.unet_offload_device())


def tiny_sd15(seed=0, context_dim=768, init_std=None, unet_overrides=None):
    """ModelPatcher around a tiny, randomly initialised SD1.5-type UNet (fp32, CPU).

    unet_overrides updates the shrunken unet_config (e.g. wider channels for benchmarks).
    Not loadable from a file by ComfyUI's loaders (detection needs model_channels 320).
    """
    _require()
    import comfy.supported_models
    unet_config = dict(TINY_SD15_UNET, context_dim=context_dim, **(unet_overrides or {}))
    model_config = comfy.supported_models.SD15(unet_config)
    model_config.unet_config["num_heads"] = TINY_SD15_HEADS  # SD15 forces 8 via unet_extra_config
    model_config.set_inference_dtype(torch.float32, None)
    model = model_config.get_model({})
    init_weights(model.diffusion_model, seed, init_std)
    model.eval()
    return _patcher(model)


def tiny_sdxl(seed=0, init_std=None, v_prediction=False):
    """ModelPatcher around a tiny SDXL-class UNet (comfy.supported_models.SDXL: context 2048, ADM input
    2816 = pooled 1280 + size embeddings), shrunken like tiny_sd15. v_prediction=True: what ComfyUI
    builds for a checkpoint with a ``v_pred`` key (SDXL v-prediction derivatives, ModelSamplingDiscrete
    with V_PREDICTION)."""
    _require()
    import comfy.supported_models
    unet_config = dict(TINY_SD15_UNET, context_dim=2048, adm_in_channels=2816, num_classes="sequential",
                       use_linear_in_transformer=True)
    model_config = comfy.supported_models.SDXL(unet_config)
    model_config.unet_config.update(num_heads=TINY_SD15_HEADS, num_head_channels=-1)  # SDXL forces 64-wide heads
    model_config.set_inference_dtype(torch.float32, None)
    model = model_config.get_model({"v_pred": torch.tensor([])} if v_prediction else {})
    init_weights(model.diffusion_model, seed, init_std)
    model.eval()
    return _patcher(model)


def tiny_sd2(seed=0, v_prediction=True, init_std=None):
    """ModelPatcher around a tiny SD2.x-class UNet: comfy.supported_models.SD20 (context 1024, linear
    projections in the transformers), shrunken like tiny_sd15; v_prediction=True gives what ComfyUI
    builds for SD2.x 768-v (BaseModel with ModelType.V_PREDICTION), False for SD2.x base (EPS)."""
    _require()
    import comfy.model_base
    import comfy.supported_models
    unet_config = dict(TINY_SD15_UNET, context_dim=1024, use_linear_in_transformer=True)
    model_config = comfy.supported_models.SD20(unet_config)
    model_config.unet_config.update(num_heads=TINY_SD15_HEADS, num_head_channels=-1)  # SD20 forces 64-wide heads
    model_config.set_inference_dtype(torch.float32, None)
    kind = comfy.model_base.ModelType.V_PREDICTION if v_prediction else comfy.model_base.ModelType.EPS
    model = comfy.model_base.BaseModel(model_config, model_type=kind)
    init_weights(model.diffusion_model, seed, init_std)
    model.eval()
    return _patcher(model)


def tiny_sd3(seed=0, depth=2, num_blocks=2, context_dim=4096, adm_in_channels=2048, pos_embed_max_size=16,
             init_std=None, qk_norm=None, x_block_self_attn_layers=()):
    """ModelPatcher around a tiny SD3 MMDiT: hidden 64*depth, `depth` heads, `num_blocks` joint blocks.

    SD3.5-class: qk_norm="rms" (RMSNorm on q and k, SD3.5 Medium and Large) and
    x_block_self_attn_layers (MMDiT-X dual attention ``x_block.attn2``, SD3.5 Medium's blocks 0-12).

    depth=24, num_blocks=6 gives the real SD3-medium width (1536, 24 heads), ~350M params.
    ComfyUI's loaders (comfy.sd.load_diffusion_model_state_dict, UNETLoader) infer
    num_blocks == depth, so only depth == num_blocks models (the default) load from a file.
    """
    _require()
    import comfy.supported_models
    hidden = 64 * depth
    unet_config = {
        "in_channels": 16, "out_channels": 16, "patch_size": 2, "depth": depth, "num_blocks": num_blocks,
        "input_size": None, "adm_in_channels": adm_in_channels,
        "context_embedder_config": {"target": "torch.nn.Linear",
                                    "params": {"in_features": context_dim, "out_features": hidden}},
        "num_patches": pos_embed_max_size ** 2, "pos_embed_max_size": pos_embed_max_size,
        "pos_embed_scaling_factor": None, "x_block_self_attn_layers": list(x_block_self_attn_layers),
    }
    if qk_norm:
        unet_config["qk_norm"] = qk_norm
    model_config = comfy.supported_models.SD3(unet_config)
    model_config.set_inference_dtype(torch.float32, None)
    model = model_config.get_model({})
    dm = model.diffusion_model
    init_weights(dm, seed, init_std)
    with torch.no_grad():
        dm.pos_embed.copy_(sincos_pos_embed_2d(hidden, pos_embed_max_size))
    model.eval()
    return _patcher(model)


TINY_FLUX = {"image_model": "flux", "in_channels": 16, "out_channels": 16, "vec_in_dim": 768,
             "context_in_dim": 4096, "hidden_size": 64, "mlp_ratio": 4.0, "num_heads": 2, "depth": 3,
             "depth_single_blocks": 2, "axes_dim": [8, 12, 12], "theta": 10000, "patch_size": 2,
             "qkv_bias": True, "guidance_embed": True}


def tiny_flux(seed=0, guidance=True, depth=3, single=2, init_std=None, overrides=None):
    """ModelPatcher around a tiny Flux.1 built through ComfyUI's classes: comfy.supported_models.Flux (dev:
    guidance embedding; ComfyUI's extra_conds feed guidance 3.5 unless the conditioning sets one) or
    FluxSchnell (guidance=False). Hidden 64, 2 heads (rotary axes 8+12+12), `depth` double-stream and
    `single` single-stream blocks, T5 context 4096 -> txt_in, CLIP-L pooled 768 -> vector_in; flow model
    (Flux's resolution-dependent shift), 16 latent channels, patch 2. `overrides` updates the config
    (e.g. a wider hidden_size/num_heads for benchmarks; axes_dim must sum to hidden/heads)."""
    _require()
    import comfy.supported_models
    cfg = dict(TINY_FLUX, guidance_embed=guidance, depth=depth, depth_single_blocks=single, **(overrides or {}))
    model_config = (comfy.supported_models.Flux if guidance else comfy.supported_models.FluxSchnell)(cfg)
    model_config.set_inference_dtype(torch.float32, None)
    model = model_config.get_model({})
    init_weights(model.diffusion_model, seed, init_std)
    model.eval()
    return _patcher(model)


def _base_model(model):
    """BaseModel from a ModelPatcher or BaseModel."""
    return model if hasattr(model, "diffusion_model") else model.model


# ---------------------------------------------------------------- tiny text encoders, VAEs, checkpoints

# SD1.5 checkpoint detection (comfy.model_detection + supported_models.SD15) needs model_channels 320,
# context_dim 768 and at least one input-level transformer; this is the smallest such UNet (13.6M params).
TINY_SD15_LOADABLE_UNET = dict(TINY_SD15_UNET, model_channels=320, channel_mult=[1], num_res_blocks=[1],
                               transformer_depth=[1], transformer_depth_output=[0, 0], transformer_depth_middle=-2)
# What comfy.sd.CLIP builds for a checkpoint's CLIP-L (comfy/sd1_clip_config.json); the loader has no way
# to read a smaller text-encoder config from a checkpoint file, so loadable checkpoints carry a full CLIP-L.
FULL_CLIP_L = {"hidden": 768, "layers": 12, "heads": 12, "intermediate": 3072}
# nodes.VAELoader's values for taesd / taesd3 (TAESD works in the model's scaled latent space).
TAESD_SCALE_SHIFT = {4: (0.18215, 0.0), 16: (1.5305, 0.0609)}


def _clip_config(hidden, layers, heads, intermediate):
    """Overrides for a CLIP text-model JSON config, passed as model_options["clip_<x>_model_config"]."""
    if hidden % heads:
        raise ValueError("hidden size {} is not divisible by {} heads".format(hidden, heads))
    return {"hidden_size": hidden, "num_hidden_layers": layers, "num_attention_heads": heads,
            "intermediate_size": intermediate or 2 * hidden}


def _tiny_clip(target, model_options, seed, inference):
    """comfy.sd.CLIP(target, model_options) built under inference mode (or not), seeded in place."""
    import comfy.sd
    with torch.inference_mode(inference):
        clip = comfy.sd.CLIP(target, model_options=model_options)
        init_weights(clip.cond_stage_model, seed)
    return clip


def tiny_clip_sd15(seed=0, width=768, layers=2, heads=2, intermediate=None, inference=True):
    """comfy.sd.CLIP for SD1.x: sd1_clip.SD1Tokenizer (the tokenizer shipped in ComfyUI) + SD1ClipModel
    whose CLIP-L text transformer is shrunk through model_options["clip_l_model_config"] (the
    te_model_options hook ComfyUI's loaders pass on): `layers` layers, `heads` heads, hidden `width`,
    MLP `intermediate` (default 2*width). Weights fp16 (ComfyUI's text-encoder dtype, also on CPU),
    seeded like init_weights.

    CLIPTextEncode gives cond (1, 77, width) (+ pooled_output (1, width), unused by SD1.5). The
    49408-token embedding dominates the size: width 768 -> 48M params (96 MB fp16).
    inference=True builds it under torch.inference_mode() like a loader node in a graph.
    """
    _require()
    import comfy.sd1_clip
    import comfy.supported_models_base
    target = comfy.supported_models_base.ClipTarget(comfy.sd1_clip.SD1Tokenizer, comfy.sd1_clip.SD1ClipModel)
    options = {"clip_l_model_config": _clip_config(width, layers, heads, intermediate)}
    return _tiny_clip(target, options, seed, inference)


def tiny_clip_sd3(seed=0, hidden_l=768, hidden_g=1280, layers=3, heads=2, intermediate=None, t5=False,
                  t5_layers=1, inference=True):
    """comfy.sd.CLIP for SD3 (text_encoders.sd3_clip.SD3Tokenizer + sd3_clip(...)) with shrunken CLIP-L/-G
    (and optionally T5-XXL) via model_options["clip_l_model_config"/"clip_g_model_config"/"t5xxl_model_config"].

    Each CLIP has `layers` layers (>= 3: SD3 reads the penultimate layer and ComfyUI asserts
    |layer_idx| < layers), `heads` heads, MLP `intermediate` (default 2*hidden). hidden_l/hidden_g None
    leaves that encoder out (ComfyUI then uses zeros: pooled 768 / 1280 zeros, G pads 768 on the left).
    CLIPTextEncode gives, like ComfyUI's SD3 pipeline: cond (1, 77, 4096) = [L | G | zero pad] and
    pooled_output (1, hidden_l + hidden_g) = [L pooled | G projected pooled]; the defaults give the real
    SD3 widths (768 + 1280 = 2048 = tiny_sd3's adm). The 49408-token embeddings cost 49408 * 2048 params
    for any L+G split with pooled 2048 (101M; 157M params in all with the defaults, 314 MB fp16).
    t5=True adds a T5-XXL with real d_model 4096 (it is concatenated to the CLIP tokens) but `t5_layers`
    layers, 2 heads of 32 and d_ff 64: cond (1, 77 + 77, 4096); +132M params (32128 x 4096 embedding).
    """
    _require()
    import comfy.supported_models_base
    import comfy.text_encoders.sd3_clip as sd3_clip
    options = {}
    if hidden_l:
        options["clip_l_model_config"] = _clip_config(hidden_l, layers, heads, intermediate)
    if hidden_g:
        options["clip_g_model_config"] = _clip_config(hidden_g, layers, heads, intermediate)
    if t5:
        options["t5xxl_model_config"] = {"num_layers": t5_layers, "num_heads": 2, "d_kv": 32, "d_ff": 64}
    target = comfy.supported_models_base.ClipTarget(
        sd3_clip.SD3Tokenizer, sd3_clip.sd3_clip(clip_l=bool(hidden_l), clip_g=bool(hidden_g), t5=t5))
    return _tiny_clip(target, options, seed, inference)


def tiny_clip_flux(seed=0, hidden_l=768, layers=2, heads=2, intermediate=None, t5_layers=1, inference=True):
    """comfy.sd.CLIP for Flux.1: text_encoders.flux.FluxTokenizer + flux_clip() (CLIP-L + T5-XXL), shrunk via
    model_options: CLIP-L `layers` x `hidden_l` (its pooled output is Flux's vec input: 768 = tiny_flux's
    vec_in_dim), T5 with the real d_model 4096 (Flux's context width) but `t5_layers` layers, 2 heads of 32
    and d_ff 64. CLIPTextEncode gives, like ComfyUI's Flux pipeline, cond = the T5 output (1, 256, 4096)
    (FluxTokenizer pads T5 to 256 tokens) and pooled_output = CLIP-L pooled (1, hidden_l).
    ~170M params (fp16 340 MB), dominated by the 32128 x 4096 T5 and 49408 x 768 CLIP embeddings."""
    _require()
    import comfy.supported_models_base
    import comfy.text_encoders.flux as flux
    options = {"clip_l_model_config": _clip_config(hidden_l, layers, heads, intermediate),
               "t5xxl_model_config": {"num_layers": t5_layers, "num_heads": 2, "d_kv": 32, "d_ff": 64}}
    target = comfy.supported_models_base.ClipTarget(flux.FluxTokenizer, flux.flux_clip())
    return _tiny_clip(target, options, seed, inference)


def tiny_flux_checkpoint(seed=0, guidance=True, inference=True):
    """(MODEL, CLIP, VAE) of a tiny Flux.1: tiny_flux + tiny_clip_flux (cond (1, 256, 4096), pooled (1, 768))
    + tiny_vae(16 channels), consistent widths, built under torch.inference_mode() by default like a loader
    node. In memory only: ComfyUI's checkpoint detection needs real Flux widths, so there is no loadable file."""
    _require()
    with torch.inference_mode(inference):
        model = tiny_flux(seed, guidance=guidance)
    clip = tiny_clip_flux(seed, inference=inference)
    vae = tiny_vae(seed, latent_channels=16, inference=inference)
    return model, clip, vae


def tiny_vae_config(latent_channels=4, ch=32, ch_mult=(1, 2, 2, 2), num_res_blocks=1):
    """`config` for comfy.sd.VAE(sd, config=...): an AutoencoderKL (SD-VAE architecture, mid-block attention)."""
    if len(ch_mult) != 4:
        raise ValueError("comfy.sd.VAE assumes a downscale of 8 for config-built VAEs: ch_mult needs 4 levels")
    ddconfig = {"double_z": True, "z_channels": latent_channels, "resolution": 256, "in_channels": 3, "out_ch": 3,
                "ch": ch, "ch_mult": list(ch_mult), "num_res_blocks": num_res_blocks, "attn_resolutions": [],
                "dropout": 0.0}
    return {"params": {"ddconfig": ddconfig, "embed_dim": latent_channels}}


def tiny_vae_state_dict(seed=0, latent_channels=4, kind="kl", **config_kwargs):
    """Seeded state dict for tiny_vae: kind "kl" (config from tiny_vae_config) or "taesd" (TAESD keys, what
    ComfyUI's checkpoint detection recognises; vae_scale/vae_shift as nodes.VAELoader sets them)."""
    _require()
    if kind not in ("kl", "taesd"):
        raise ValueError("kind must be 'kl' or 'taesd'")
    with torch.inference_mode(False):  # a throwaway module, also when called inside a ComfyUI graph
        if kind == "kl":
            from comfy.ldm.models.autoencoder import AutoencoderKL
            net = AutoencoderKL(**tiny_vae_config(latent_channels, **config_kwargs)["params"])
        else:
            import comfy.taesd.taesd
            net = comfy.taesd.taesd.TAESD(latent_channels=latent_channels)
        init_weights(net, seed)
        sd = net.state_dict()
    if kind == "taesd":
        scale, shift = TAESD_SCALE_SHIFT[latent_channels]
        sd["vae_scale"], sd["vae_shift"] = torch.tensor(scale), torch.tensor(shift)
    return sd


def tiny_vae(seed=0, latent_channels=4, kind="kl", inference=True, **config_kwargs):
    """comfy.sd.VAE built by ComfyUI's constructor from a seeded state dict (+ config for "kl").

    kind "kl": AutoencoderKL with ch 32, ch_mult (1, 2, 2, 2), 1 res block/level (~1.3M params),
    downscale 8 (64 px -> 8x8 latent), latent_channels 4 (SD1.5) or 16 (SD3); VAEEncode returns the
    posterior mode (deterministic). kind "taesd": comfy.taesd.taesd.TAESD (64 channels, ~2.4M params,
    downscale 8), detected from the state dict alone (what tiny checkpoint files carry).
    """
    _require()
    import comfy.sd
    sd = tiny_vae_state_dict(seed, latent_channels, kind, **config_kwargs)
    config = tiny_vae_config(latent_channels, **config_kwargs) if kind == "kl" else None
    with torch.inference_mode(inference):
        vae = comfy.sd.VAE(sd=sd, config=config)
    # comfy.sd.VAE's config branch keeps its 4-channel default here (tiled encoding allocates with it).
    vae.latent_channels = latent_channels
    return vae


FAMILIES = ("sd15", "sd3")


def tiny_checkpoint(family="sd15", seed=0, inference=True, loadable=False):
    """(MODEL ModelPatcher, CLIP, VAE) for `family` "sd15" or "sd3", all from `seed`, consistent widths.

    sd15: tiny_sd15 (context 768) + tiny_clip_sd15 (cond (1, 77, 768)) + tiny_vae(4 channels).
    sd3:  tiny_sd3 (context 4096, adm 2048) + tiny_clip_sd3 (cond (1, 77, 4096), pooled (1, 2048))
          + tiny_vae(16 channels).
    loadable=True: the smallest configuration ComfyUI's checkpoint loader detects, built by
    comfy.sd.load_state_dict_guess_config from tiny_checkpoint_state_dict (what save_tiny_checkpoint
    writes, so the file loads back identical): UNet/MMDiT as in tiny_checkpoint_state_dict, full CLIP-L,
    TAESD VAE.
    inference=True builds everything under torch.inference_mode() (inference-tensor weights, as
    a loader node in a ComfyUI graph produces).
    """
    _require()
    if family not in FAMILIES:
        raise ValueError("family must be one of {}".format(FAMILIES))
    if loadable:
        import comfy.sd
        sd = tiny_checkpoint_state_dict(family, seed)
        with torch.inference_mode(inference):
            return tuple(comfy.sd.load_state_dict_guess_config(sd, output_vae=True, output_clip=True)[:3])
    with torch.inference_mode(inference):
        model = tiny_sd15(seed) if family == "sd15" else tiny_sd3(seed)
    clip = tiny_clip_sd15(seed, inference=inference) if family == "sd15" else tiny_clip_sd3(seed, inference=inference)
    vae = tiny_vae(seed, latent_channels=_base_model(model).latent_format.latent_channels, inference=inference)
    return model, clip, vae


def _loadable_model(family, seed):
    import comfy.supported_models
    if family == "sd3":
        return tiny_sd3(seed)  # depth == num_blocks: detected as SD3 (hidden 128, 2 joint blocks)
    model_config = comfy.supported_models.SD15(dict(TINY_SD15_LOADABLE_UNET))  # num_heads 8, as the loader
    model_config.set_inference_dtype(torch.float32, None)
    model = model_config.get_model({})
    init_weights(model.diffusion_model, seed)
    return _patcher(model.eval())


def tiny_checkpoint_state_dict(family="sd15", seed=0, dtype=torch.float16):
    """Single-file checkpoint state dict (LDM keys, `dtype`) that ComfyUI's checkpoint loader detects.

    A new dict each call, but its tensors are cached (the last 2 (family, seed, dtype)) and shared:
    never modify them in place.

    Keys via ComfyUI's own saving path (BaseModel.state_dict_for_saving, as comfy.sd.save_checkpoint):
    model.diffusion_model.* + first_stage_model.* (TAESD) + cond_stage_model.* (sd15) /
    text_encoders.clip_l.* (sd3). Contents:
      sd15: SD1.5 UNet with model_channels 320 (detection requires it), one level, 1 res block + 1
            transformer, no middle block, 2 plain output res blocks (13.6M params); full 12-layer CLIP-L.
      sd3:  tiny_sd3 MMDiT (depth 2 == num_blocks: hidden 128, 1.9M params); full CLIP-L only
            (no CLIP-G / T5: ComfyUI fills their part with zeros; pooled = [L pooled | 1280 zeros]).
    Both: TAESD VAE (2.4M params). 139M (sd15) / 128M (sd3) params, dominated by CLIP-L (123M): the
    checkpoint loader builds text encoders from ComfyUI's JSON configs (CLIP-G would add 695M), and a
    shrunken CLIP loads only if the caller passes te_model_options={"clip_l_model_config": {...}}.
    """
    _require()
    if family not in FAMILIES:
        raise ValueError("family must be one of {}".format(FAMILIES))
    return dict(_checkpoint_state_dict(family, seed, dtype))


@functools.lru_cache(maxsize=2)
def _checkpoint_state_dict(family, seed, dtype):
    with torch.inference_mode(False):
        model = _loadable_model(family, seed)
        if family == "sd15":
            clip = tiny_clip_sd15(seed, width=FULL_CLIP_L["hidden"], layers=FULL_CLIP_L["layers"],
                                  heads=FULL_CLIP_L["heads"], intermediate=FULL_CLIP_L["intermediate"], inference=False)
        else:
            clip = tiny_clip_sd3(seed, hidden_l=FULL_CLIP_L["hidden"], hidden_g=None, layers=FULL_CLIP_L["layers"],
                                 heads=FULL_CLIP_L["heads"], intermediate=FULL_CLIP_L["intermediate"], inference=False)
        vae_sd = tiny_vae_state_dict(seed, _base_model(model).latent_format.latent_channels, kind="taesd")
        sd = model.model.state_dict_for_saving(clip.get_sd(), vae_sd)
    return {k: (v.to(dtype) if v.is_floating_point() else v).contiguous() for k, v in sd.items()}


def save_tiny_checkpoint(path, family="sd15", seed=0, dtype=torch.float16):
    """Write tiny_checkpoint_state_dict(family, seed, dtype) as one .safetensors file (comfy.utils.save_torch_file).

    comfy.sd.load_checkpoint_guess_config(path) (CheckpointLoaderSimple) returns models identical to
    tiny_checkpoint(family, seed, loadable=True). fp16: 278 MB (sd15) / 256 MB (sd3). Returns path.
    """
    _require()
    import comfy.utils
    comfy.utils.save_torch_file(tiny_checkpoint_state_dict(family, seed, dtype), path)
    return path


# ---------------------------------------------------------------- sampling

def make_cond(context, pooled=None):
    """ComfyUI CONDITIONING list: [[tokens (B,L,D), {"pooled_output": (B,P)}]]."""
    extra = {} if pooled is None else {"pooled_output": pooled}
    return [[context, extra]]


def sample(model_patcher, positive_context, negative_context, positive_pooled=None, negative_pooled=None,
           latent_hw=(8, 8), batch=1, steps=3, cfg=4.0, seed=0, sampler_name="euler", scheduler="normal",
           latent=None, denoise=1.0, return_calls=False):
    """Run real ComfyUI sampling (comfy.sample.sample, i.e. what KSampler does) on a tiny latent.

    Contexts are (B, L, D) token tensors in ComfyUI's CONDITIONING format. Models with an ADM
    input (SD3) or a pooled vector input (Flux) get zero pooled vectors when none are given.
    The result is in VAE latent space
    (process_latent_out applied: SD15 /0.18215, SD3 /1.5305 + 0.0609), float32, CPU.
    Runs under torch.no_grad(). With return_calls=True also returns one dict per model call:
    {"cond_or_uncond": [...], "batch": int, "sigma": tensor}.
    """
    _require()
    import comfy.sample
    base = _base_model(model_patcher)
    if latent is None:
        c = base.latent_format.latent_channels
        latent = torch.zeros(batch, c, *latent_hw)
    params = getattr(base.diffusion_model, "params", None)  # Flux: adm_channels 0, pooled -> vector_in
    pooled_width = base.adm_channels or (params.vec_in_dim if hasattr(params, "vec_in_dim") else 0)
    if pooled_width:
        if positive_pooled is None:
            positive_pooled = torch.zeros(positive_context.shape[0], pooled_width)
        if negative_pooled is None:
            negative_pooled = torch.zeros(negative_context.shape[0], pooled_width)
    positive = make_cond(positive_context, positive_pooled)
    negative = make_cond(negative_context, negative_pooled)

    calls = []
    mp = model_patcher.clone()
    inner = mp.model_options.get("model_function_wrapper")

    def recorder(apply_model, args):
        calls.append({"cond_or_uncond": list(args["cond_or_uncond"]), "batch": args["input"].shape[0],
                      "sigma": args["timestep"].detach().clone()})
        if inner is not None:
            return inner(apply_model, args)
        return apply_model(args["input"], args["timestep"], **args["c"])

    mp.set_model_unet_function_wrapper(recorder)
    noise = comfy.sample.prepare_noise(latent, seed)
    with torch.no_grad():
        out = comfy.sample.sample(mp, noise, steps, cfg, sampler_name, scheduler, positive, negative, latent,
                                  denoise=denoise, disable_pbar=True, seed=seed)
    return (out, calls) if return_calls else out


# ---------------------------------------------------------------- diffusers conversion

def _convert(key_map, comfy_sd):
    """Apply a comfy.utils `*_to_diffusers` map (diffusers key -> comfy key | (key, narrow, fn))."""
    out, used = {}, set()
    for dkey, target in key_map.items():
        if isinstance(target, str):
            ckey, narrow, fn = target, None, None
        else:
            ckey, narrow = target[0], target[1]
            fn = target[2] if len(target) > 2 else None
        if ckey not in comfy_sd:
            continue
        w = comfy_sd[ckey]
        if narrow is not None:
            w = w.narrow(*narrow)
        if fn is not None:
            w = fn(w)  # only swap_scale_shift is used; it is its own inverse
        out[dkey] = w.clone()
        used.add(ckey)
    left = sorted(set(comfy_sd) - used)
    if left:
        raise KeyError("comfy keys without a diffusers mapping: {}".format(left[:10]))
    return out


def _invert(key_map, diffusers_sd):
    """Inverse of _convert: diffusers state dict -> comfy state dict (re-fusing qkv)."""
    parts = {}
    for dkey, target in key_map.items():
        if dkey not in diffusers_sd:
            continue
        w = diffusers_sd[dkey]
        if isinstance(target, str):
            parts.setdefault(target, []).append((0, w))
            continue
        ckey, narrow = target[0], target[1]
        if len(target) > 2:
            w = target[2](w)
        parts.setdefault(ckey, []).append((narrow[1] if narrow else 0, w))
    return {k: (v[0][1] if len(v) == 1 else torch.cat([w for _, w in sorted(v, key=lambda t: t[0])], 0)).clone()
            for k, v in parts.items()}


def unet_key_map(unet_config):
    """diffusers key -> comfy key for a UNet config (comfy.utils.unet_to_diffusers)."""
    _require()
    import comfy.utils
    return comfy.utils.unet_to_diffusers(unet_config)


def sd3_key_map(depth, num_blocks):
    """diffusers key -> comfy key for an MMDiT, fixing comfy.utils.mmdit_to_diffusers for num_blocks != depth.

    Upstream applies the last-block context adaLN (shift,scale)<->(scale,shift) swap to
    block depth-1 instead of num_blocks-1.
    """
    _require()
    import comfy.utils
    km = comfy.utils.mmdit_to_diffusers({"depth": depth, "num_blocks": num_blocks})
    last = num_blocks - 1
    for end in ("weight", "bias"):
        wrong = "transformer_blocks.{}.norm1_context.linear.{}".format(depth - 1, end)
        if depth - 1 != last:
            if depth - 1 < num_blocks:
                km[wrong] = "joint_blocks.{}.context_block.adaLN_modulation.1.{}".format(depth - 1, end)
            else:
                km.pop(wrong, None)
            km["transformer_blocks.{}.norm1_context.linear.{}".format(last, end)] = (
                "joint_blocks.{}.context_block.adaLN_modulation.1.{}".format(last, end), None, comfy.utils.swap_scale_shift)
    return km


def _sd3_dims(model):
    dm = _base_model(model).diffusion_model
    return dm.depth, len(dm.joint_blocks)


def comfy_to_diffusers_unet_state_dict(model, state_dict=None):
    """Tiny SD15 (ModelPatcher/BaseModel) weights -> UNet2DConditionModel state dict."""
    base = _base_model(model)
    sd = state_dict if state_dict is not None else base.diffusion_model.state_dict()
    return _convert(unet_key_map(base.model_config.unet_config), sd)


def diffusers_to_comfy_unet_state_dict(model, diffusers_sd):
    """UNet2DConditionModel state dict -> comfy diffusion_model state dict for `model`'s config."""
    return _invert(unet_key_map(_base_model(model).model_config.unet_config), diffusers_sd)


def comfy_to_diffusers_sd3_state_dict(model, state_dict=None):
    """Tiny SD3 (ModelPatcher/BaseModel) weights -> SD3Transformer2DModel state dict."""
    base = _base_model(model)
    sd = state_dict if state_dict is not None else base.diffusion_model.state_dict()
    return _convert(sd3_key_map(*_sd3_dims(base)), sd)


def diffusers_to_comfy_sd3_state_dict(model, diffusers_sd):
    """SD3Transformer2DModel state dict -> comfy diffusion_model state dict for `model`'s shape."""
    return _invert(sd3_key_map(*_sd3_dims(model)), diffusers_sd)


def diffusers_unet_config(model):
    """UNet2DConditionModel kwargs matching a tiny comfy SD15 model (num_heads style configs only)."""
    cfg = _base_model(model).model_config.unet_config
    nrb = cfg["num_res_blocks"]
    assert len(set(nrb)) == 1 and cfg["num_heads"] > 0
    mult = cfg["channel_mult"]
    depth = [cfg["transformer_depth"][sum(nrb[:i])] for i in range(len(mult))]
    down = ["CrossAttnDownBlock2D" if d else "DownBlock2D" for d in depth]
    up = ["CrossAttnUpBlock2D" if d else "UpBlock2D" for d in reversed(depth)]
    return dict(
        sample_size=cfg["image_size"], in_channels=cfg["in_channels"], out_channels=cfg["out_channels"],
        down_block_types=tuple(down), up_block_types=tuple(up),
        block_out_channels=tuple(cfg["model_channels"] * m for m in mult), layers_per_block=nrb[0],
        transformer_layers_per_block=tuple(max(d, 1) for d in depth),
        cross_attention_dim=cfg["context_dim"], attention_head_dim=cfg["num_heads"],  # diffusers: = #heads
        use_linear_projection=cfg["use_linear_in_transformer"], norm_num_groups=32,
        flip_sin_to_cos=True, freq_shift=0,
    )


def diffusers_sd3_config(model):
    """SD3Transformer2DModel kwargs matching a tiny comfy SD3 model."""
    base = _base_model(model)
    cfg, dm = base.model_config.unet_config, base.diffusion_model
    pe = cfg["pos_embed_max_size"]
    return dict(
        sample_size=pe * cfg["patch_size"],  # -> diffusers' own table == sincos_pos_embed_2d
        patch_size=cfg["patch_size"], in_channels=cfg["in_channels"], out_channels=dm.out_channels,
        num_layers=len(dm.joint_blocks), attention_head_dim=64, num_attention_heads=dm.depth,
        joint_attention_dim=cfg["context_embedder_config"]["params"]["in_features"],
        caption_projection_dim=dm.hidden_size, pooled_projection_dim=cfg["adm_in_channels"],
        pos_embed_max_size=pe, qk_norm="rms_norm" if cfg.get("qk_norm") else None,
        dual_attention_layers=tuple(cfg.get("x_block_self_attn_layers") or ()),
    )


def diffusers_unet(model):
    """diffusers UNet2DConditionModel (fp32, eval) with the same weights as a tiny comfy SD15."""
    from diffusers import UNet2DConditionModel
    return _load_meta(UNet2DConditionModel, diffusers_unet_config(model), comfy_to_diffusers_unet_state_dict(model))


def diffusers_sd3(model):
    """diffusers SD3Transformer2DModel (fp32, eval) with the same weights as a tiny comfy SD3."""
    from diffusers import SD3Transformer2DModel
    return _load_meta(SD3Transformer2DModel, diffusers_sd3_config(model), comfy_to_diffusers_sd3_state_dict(model))


def diffusers_flux_config(model):
    """FluxTransformer2DModel kwargs matching a tiny comfy Flux.1 (tiny_flux, any overrides): diffusers works on
    the packed latent (2x2 patches -> in_channels * 4, patch_size 1)."""
    cfg = _base_model(model).model_config.unet_config
    p = cfg["patch_size"]
    return dict(
        patch_size=1, in_channels=cfg["in_channels"] * p * p, out_channels=cfg["out_channels"] * p * p,
        num_layers=cfg["depth"], num_single_layers=cfg["depth_single_blocks"],
        attention_head_dim=cfg["hidden_size"] // cfg["num_heads"], num_attention_heads=cfg["num_heads"],
        joint_attention_dim=cfg["context_in_dim"], pooled_projection_dim=cfg["vec_in_dim"],
        guidance_embeds=cfg["guidance_embed"], axes_dims_rope=tuple(cfg["axes_dim"]),
    )


def diffusers_flux(model):
    """diffusers FluxTransformer2DModel (fp32, eval) with the same weights as a tiny comfy Flux.1
    (comfy.utils.flux_to_diffusers key map)."""
    _require()
    import comfy.utils
    from diffusers import FluxTransformer2DModel
    base = _base_model(model)
    key_map = comfy.utils.flux_to_diffusers(base.model_config.unet_config, output_prefix="")
    return _load_meta(FluxTransformer2DModel, diffusers_flux_config(model),
                      _convert(key_map, base.diffusion_model.state_dict()))


def _load_meta(cls, config, state_dict):
    """Build a diffusers model on the meta device (skips its slow init) and assign `state_dict` strictly."""
    with torch.device("meta"):
        net = cls(**config)
    net.load_state_dict(state_dict, strict=True, assign=True)
    left = [n for n, t in list(net.named_parameters()) + list(net.named_buffers()) if t.is_meta]
    if left:
        raise RuntimeError("tensors left on meta device: {}".format(left[:10]))
    return net.eval()


# ---------------------------------------------------------------- server

class ComfyServer:
    """A `python main.py --cpu` subprocess bound to 127.0.0.1 with a temp base directory."""

    def __init__(self, proc, port, base_dir, log_path):
        self.proc, self.port, self.base_dir, self.log_path = proc, port, base_dir, log_path
        self.url = "http://127.0.0.1:{}".format(port)
        self.output_dir = os.path.join(base_dir, "output")
        self.final_log = None  # server log text, kept after stop()

    def get(self, path, timeout=10):
        """GET JSON from the server."""
        with urllib.request.urlopen(self.url + path, timeout=timeout) as r:
            return json.loads(r.read())

    def post(self, path, data, timeout=30):
        """POST JSON; returns parsed JSON (raises RuntimeError with the body on HTTP errors)."""
        req = urllib.request.Request(self.url + path, data=json.dumps(data).encode(),
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=timeout) as r:
                body = r.read()
        except urllib.error.HTTPError as e:
            raise RuntimeError("POST {} -> {}: {}".format(path, e.code, e.read().decode(errors="replace")))
        return json.loads(body) if body else None

    def log(self):
        """Server stdout+stderr so far (still available after stop())."""
        if self.final_log is not None:
            return self.final_log
        with open(self.log_path, errors="replace") as f:
            return f.read()

    def failed_custom_nodes(self):
        """Custom-node paths that ComfyUI reported as '(IMPORT FAILED)' (core comfy_extras failures excluded)."""
        return [line.split("(IMPORT FAILED):", 1)[1].strip()
                for line in self.log().splitlines() if "(IMPORT FAILED):" in line]

    def post_prompt(self, graph, client_id="comfy-env-tests"):
        """Queue an API-format graph; returns prompt_id."""
        return self.post("/prompt", {"prompt": graph, "client_id": client_id})["prompt_id"]

    def wait_history(self, prompt_id, timeout=120.0, poll=0.25):
        """Poll /history/<id> until the prompt finished; returns its history entry."""
        end = time.time() + timeout
        while time.time() < end:
            h = self.get("/history/{}".format(prompt_id))
            if prompt_id in h and h[prompt_id].get("status", {}).get("completed") is not None:
                return h[prompt_id]
            if self.proc.poll() is not None:
                raise RuntimeError("ComfyUI exited:\n" + self.log()[-4000:])
            time.sleep(poll)
        raise TimeoutError("prompt {} not finished after {}s".format(prompt_id, timeout))

    def stop(self, timeout=15.0):
        """Terminate (then kill) the server process and delete the temp base directory."""
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(timeout)
        if self.final_log is None and os.path.exists(self.log_path):
            self.final_log = self.log()
        shutil.rmtree(self.base_dir, ignore_errors=True)
        return self.proc.returncode


def free_port():
    """An unused loopback TCP port."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


_SERVER = None


def start_server(port=None, packs=(), extra_custom_nodes_dirs=(), timeout=60.0, extra_args=(), env=None):
    """Launch ComfyUI on 127.0.0.1 and wait until /object_info answers; returns a ComfyServer.

    Everything ComfyUI writes (models/, custom_nodes/, input/, output/, temp/, user/,
    sqlite db) goes to a temp `--base-directory`. `packs` are node-pack directories (or
    (path, link_name) pairs) symlinked into <tmp>/custom_nodes/; `extra_custom_nodes_dirs` are directories *containing*
    packs, registered through an `--extra-model-paths-config` YAML `custom_nodes:` entry.
    `extra_args` are appended to the command line; `env` adds environment variables
    (e.g. {"OMP_NUM_THREADS": "1"}).
    """
    global _SERVER
    root = find_comfyui()
    if root is None:
        raise RuntimeError("ComfyUI not found: set COMFYUI_PATH")
    port = port or free_port()
    base = tempfile.mkdtemp(prefix="comfy_env_")
    for d in ("custom_nodes", "models", "input", "output", "temp", "user"):
        os.makedirs(os.path.join(base, d))
    for p in packs:
        p, name = (p, None) if isinstance(p, (str, os.PathLike)) else p
        p = os.path.abspath(p)
        os.symlink(p, os.path.join(base, "custom_nodes", name or os.path.basename(p)))
    cmd = [sys.executable, "main.py", "--cpu", "--listen", "127.0.0.1", "--port", str(port),
           "--base-directory", base, "--database-url", "sqlite:///" + os.path.join(base, "user", "comfyui.db"),
           "--disable-api-nodes"]
    if extra_custom_nodes_dirs:
        yml = os.path.join(base, "extra_model_paths.yaml")
        with open(yml, "w") as f:
            f.write("comfy_env:\n  custom_nodes: |\n")
            for d in extra_custom_nodes_dirs:
                f.write("    {}\n".format(os.path.abspath(d)))
        cmd += ["--extra-model-paths-config", yml]
    cmd += list(extra_args)
    env = dict(os.environ, PYTHONDONTWRITEBYTECODE="1", PYTHONUNBUFFERED="1", **(env or {}))
    log_path = os.path.join(base, "server.log")
    with open(log_path, "w") as log:
        proc = subprocess.Popen(cmd, cwd=root, env=env, stdout=log, stderr=subprocess.STDOUT,
                                stdin=subprocess.DEVNULL)
    server = ComfyServer(proc, port, base, log_path)
    _SERVER = server
    atexit.register(server.stop)  # no orphaned server if a test run is aborted
    end = time.time() + timeout
    while True:
        if proc.poll() is not None:
            text = server.log()
            server.stop()
            raise RuntimeError("ComfyUI exited with {}:\n{}".format(proc.returncode, text[-4000:]))
        try:
            server.get("/object_info", timeout=5)
            return server
        except (urllib.error.URLError, ConnectionError, OSError, ValueError):
            pass
        if time.time() > end:
            text = server.log()
            server.stop()
            raise TimeoutError("ComfyUI did not answer /object_info in {}s:\n{}".format(timeout, text[-4000:]))
        time.sleep(0.5)


def stop_server(server=None):
    """Stop `server` (default: the last one started)."""
    global _SERVER
    server = server or _SERVER
    if server is not None:
        server.stop()
    if server is _SERVER:
        _SERVER = None


def post_prompt(graph, server=None):
    """Queue a graph on `server` (default: the last one started); returns prompt_id."""
    return (server or _SERVER).post_prompt(graph)


def wait_history(prompt_id, timeout=120.0, server=None):
    """Wait for a prompt on `server` (default: the last one started); returns its history entry."""
    return (server or _SERVER).wait_history(prompt_id, timeout)
