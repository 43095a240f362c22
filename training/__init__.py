"""Soft-token alignment engine (SoftREPA, AGSM): layouts, token files, diffusers backend, training.

Importable with torch alone; nothing here imports ComfyUI.
"""

from .formats import load_tokens, save_tokens
from .layouts import TokenLayout, time_bucket
from .tokens import SoftTokens

__all__ = ["TokenLayout", "SoftTokens", "load_tokens", "save_tokens", "time_bucket"]
