"""Nodes that put soft tokens into a MODEL: Load Soft Tokens and Apply Soft Tokens."""

from __future__ import annotations

from comfy_api.latest import io

from ..training.formats import load_tokens
from ..training.layouts import parse_blocks
from .patch import APPLY_TO, apply_soft_tokens
from .paths import list_token_files, resolve_token_file

SoftTokensType = io.Custom("SOFT_TOKENS")

STRENGTH_TOOLTIP = ("1 = the official behaviour. 0 = off (output identical to the model without tokens). "
                    "In between, the soft tokens receive that fraction of the attention they get at 1 "
                    "(smooth, no extra cost); above 1 they receive more.")
APPLY_TO_TOOLTIP = ("both: tokens in the conditional and unconditional CFG branches (SoftREPA and AGSM "
                    "default). cond_only: only in the conditional branch.")


def strength_input():
    return io.Float.Input("strength", default=1.0, min=0.0, max=3.0, step=0.05, tooltip=STRENGTH_TOOLTIP)


def apply_to_input():
    return io.Combo.Input("apply_to", options=list(APPLY_TO), default="both", tooltip=APPLY_TO_TOOLTIP)


class LoadSoftTokens(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="LoadSoftTokens",
            display_name="Load Soft Tokens",
            category="conditioning/soft tokens",
            description="Loads SoftREPA/AGSM soft tokens and inserts them into the denoiser's text "
                        "stream, so the model follows prompts more closely. The input model is not changed.",
            inputs=[
                io.Model.Input("model", tooltip="An SD1.5, SDXL or SD3 model."),
                io.Combo.Input("token_file", options=list_token_files(),
                               tooltip="A .safetensors token file or an official token folder "
                                       "(dc_tokens.pth [+ dc_t_tokens.pth], or soft_tokens.pth + "
                                       "soft_t_tokens.pth) in models/soft_tokens."),
                strength_input(),
                apply_to_input(),
                io.String.Input("blocks", default="", optional=True,
                                tooltip="Leave empty to use the blocks the tokens were trained for. "
                                        "Override: 'down', 'down,mid' (SD1.5/SDXL) or '0-4' (SD3)."),
            ],
            outputs=[io.Model.Output(tooltip="The model with soft tokens."),
                     SoftTokensType.Output(display_name="soft_tokens", tooltip="The loaded tokens.")],
        )

    @classmethod
    def execute(cls, model, token_file, strength, apply_to, blocks="") -> io.NodeOutput:
        blocks = parse_blocks(blocks) if blocks.strip() else None
        tokens = load_tokens(resolve_token_file(token_file), blocks=blocks)
        patched = apply_soft_tokens(model, tokens, strength, apply_to, name=f"token file {token_file!r}")
        return io.NodeOutput(patched, tokens)


class ApplySoftTokens(io.ComfyNode):
    @classmethod
    def define_schema(cls) -> io.Schema:
        return io.Schema(
            node_id="ApplySoftTokens",
            display_name="Apply Soft Tokens",
            category="conditioning/soft tokens",
            description="Inserts soft tokens (from Load Soft Tokens or a trainer) into a model.",
            inputs=[io.Model.Input("model"), SoftTokensType.Input("soft_tokens"), strength_input(),
                    apply_to_input()],
            outputs=[io.Model.Output(tooltip="The model with soft tokens.")],
        )

    @classmethod
    def execute(cls, model, soft_tokens, strength, apply_to) -> io.NodeOutput:
        return io.NodeOutput(apply_soft_tokens(model, soft_tokens, strength, apply_to))
