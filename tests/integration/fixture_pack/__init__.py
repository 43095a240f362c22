"""Test-only ComfyUI nodes: tiny random models and conditioning. Never shipped in the node list."""

import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.dirname(os.path.realpath(__file__)))))
import comfy_env  # noqa: E402


class TinySD15:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"context_dim": ([768, 2048],), "seed": ("INT", {"default": 0})}}

    RETURN_TYPES = ("MODEL",)
    FUNCTION = "load"
    CATEGORY = "_for_testing/soft tokens"

    def load(self, context_dim, seed):
        return (comfy_env.tiny_sd15(seed=seed, context_dim=int(context_dim)),)


class RandomConditioning:
    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"width": ("INT", {"default": 768}), "length": ("INT", {"default": 77}),
                             "seed": ("INT", {"default": 0})}}

    RETURN_TYPES = ("CONDITIONING",)
    FUNCTION = "make"
    CATEGORY = "_for_testing/soft tokens"

    def make(self, width, length, seed):
        g = torch.Generator().manual_seed(seed)
        return ([[torch.randn(1, length, width, generator=g), {}]],)


class TinyCheckpoint:
    """(MODEL, CLIP, VAE) from comfy_env.tiny_checkpoint: tiny random SD1.5 or SD3 built through ComfyUI's classes."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"family": (list(comfy_env.FAMILIES),), "seed": ("INT", {"default": 0})}}

    RETURN_TYPES = ("MODEL", "CLIP", "VAE")
    FUNCTION = "load"
    CATEGORY = "_for_testing/soft tokens"

    def load(self, family, seed):
        return comfy_env.tiny_checkpoint(family, seed=seed)


def tiny_sdxl_checkpoint(seed=0, inference=True):
    """(MODEL, CLIP, VAE) of a tiny SDXL-class model: comfy_env.tiny_sdxl (context 2048, ADM 2816) with ComfyUI's SDXL
    text encoder pair shrunk to 3 layers (CLIP-L 768 + CLIP-G 1280 wide: cond (1, 77, 2048), pooled (1, 1280)) and a
    tiny 4-channel VAE. Built like comfy_env.tiny_checkpoint; official SDXL soft tokens (4 x 2048) fit it."""
    import comfy.sdxl_clip
    import comfy.supported_models_base

    with torch.inference_mode(inference):
        model = comfy_env.tiny_sdxl(seed)
    target = comfy.supported_models_base.ClipTarget(comfy.sdxl_clip.SDXLTokenizer, comfy.sdxl_clip.SDXLClipModel)
    options = {"clip_l_model_config": comfy_env._clip_config(768, 3, 2, None),
               "clip_g_model_config": comfy_env._clip_config(1280, 3, 2, None)}
    clip = comfy_env._tiny_clip(target, options, seed, inference)
    vae = comfy_env.tiny_vae(seed, latent_channels=4, inference=inference)
    return model, clip, vae


class TinySDXLCheckpoint:
    """(MODEL, CLIP, VAE) of a tiny SDXL-class model (tiny_sdxl_checkpoint)."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"seed": ("INT", {"default": 0})}}

    RETURN_TYPES = ("MODEL", "CLIP", "VAE")
    FUNCTION = "load"
    CATEGORY = "_for_testing/soft tokens"

    def load(self, seed):
        return tiny_sdxl_checkpoint(seed)


class TinyFluxCheckpoint:
    """(MODEL, CLIP, VAE) of a tiny Flux.1 (comfy_env.tiny_flux_checkpoint): dev (guidance embedding) or schnell."""

    @classmethod
    def INPUT_TYPES(cls):
        return {"required": {"variant": (["dev", "schnell"],), "seed": ("INT", {"default": 0})}}

    RETURN_TYPES = ("MODEL", "CLIP", "VAE")
    FUNCTION = "load"
    CATEGORY = "_for_testing/soft tokens"

    def load(self, variant, seed):
        return comfy_env.tiny_flux_checkpoint(seed, guidance=variant == "dev")


NODE_CLASS_MAPPINGS = {"SoftTokensTestTinySD15": TinySD15, "SoftTokensTestConditioning": RandomConditioning,
                       "SoftTokensTestTinyCheckpoint": TinyCheckpoint,
                       "SoftTokensTestTinySDXLCheckpoint": TinySDXLCheckpoint,
                       "SoftTokensTestTinyFluxCheckpoint": TinyFluxCheckpoint}
