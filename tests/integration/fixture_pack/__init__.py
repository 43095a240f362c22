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


NODE_CLASS_MAPPINGS = {"SoftTokensTestTinySD15": TinySD15, "SoftTokensTestConditioning": RandomConditioning,
                       "SoftTokensTestTinyCheckpoint": TinyCheckpoint}
