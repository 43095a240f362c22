"""Tiny diffusers denoisers with random weights, for tests and benchmarks."""

import torch


def tiny_unet(cross_attention_dim: int = 768, seed: int = 0):
    """A UNet2DConditionModel with cross-attention in down, mid and up blocks."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1,
        block_out_channels=(32, 64), norm_num_groups=8, attention_head_dim=8,
        down_block_types=("CrossAttnDownBlock2D", "CrossAttnDownBlock2D"),
        up_block_types=("CrossAttnUpBlock2D", "CrossAttnUpBlock2D"),
        cross_attention_dim=cross_attention_dim,
    ).eval()


def tiny_sd3(num_layers: int = 3, heads: int = 24, head_dim: int = 64, joint_attention_dim: int = 4096,
             seed: int = 0):
    """An SD3Transformer2DModel; the defaults give SD3-medium's 1536-wide text stream."""
    from diffusers import SD3Transformer2DModel

    torch.manual_seed(seed)
    return SD3Transformer2DModel(
        sample_size=8, patch_size=2, in_channels=4, out_channels=4, num_layers=num_layers,
        attention_head_dim=head_dim, num_attention_heads=heads, joint_attention_dim=joint_attention_dim,
        caption_projection_dim=heads * head_dim, pooled_projection_dim=64, pos_embed_max_size=16,
    ).eval()
