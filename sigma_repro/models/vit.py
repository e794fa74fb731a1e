"""Vision Transformers for the image tables: timm's ``VisionTransformer`` at the paper's sizes.

Sizes follow timm/DeiT (tiny 192x12x3, small 384x12x6, base 768x12x12, large 1024x24x16), plus a
``digits`` proxy size for the embedded 8x8 data. Image size, channels and classes come from the data
module at build time, so one model config serves every data set. ``norm`` is the suite's one
norm setting (pre | post | none, as in ``sigma_repro.models.residual``): timm's ViT is pre-LN, and
``norm="none"`` builds it with every norm layer an identity (the paper's no-LN ViT).
"""

from __future__ import annotations

import torch
from torch import nn
from timm.models.vision_transformer import VisionTransformer

from sigma_repro.errors import ConfigError

# timm builds every norm layer of the ViT (blocks, final norm, pooled-feature norm) from norm_layer.
VIT_NORMS = {"pre": {}, "none": {"norm_layer": nn.Identity}}


def build_vit(
    *,
    img_size: int,
    in_chans: int,
    num_classes: int,
    patch_size: int = 16,
    embed_dim: int = 192,
    depth: int = 12,
    num_heads: int = 3,
    mlp_ratio: float = 4.0,
    qkv_bias: bool = True,
    drop_rate: float = 0.0,
    attn_drop_rate: float = 0.0,
    drop_path_rate: float = 0.0,
    global_pool: str = "token",
    patch_embed_init_gain: float = 1.0,
    norm: str = "pre",
) -> VisionTransformer:
    """A timm ViT; ``patch_embed_init_gain`` scales the patch-embedding init (the paper's ViT-L uses 0.125)."""
    if img_size % patch_size:
        raise ConfigError(
            f"model.patch_size={patch_size} does not divide the data's image size {img_size}: "
            f"pick a patch size that divides {img_size} (e.g. model=vit_digits for 8x8 digits, "
            f"patch 16 for 224x224 ImageNet)."
        )
    if norm not in VIT_NORMS:
        raise ConfigError(f"model.norm={norm!r} is not a ViT norm placement: timm's ViT is pre-LN, so use one of "
                          f"{list(VIT_NORMS)} (post-LN exists for the transformer stacks of translation and LM)")
    if embed_dim % num_heads:
        raise ConfigError(
            f"model.embed_dim={embed_dim} is not divisible by model.num_heads={num_heads}; "
            f"choose num_heads among the divisors of {embed_dim}."
        )
    model = VisionTransformer(
        img_size=img_size,
        patch_size=patch_size,
        in_chans=in_chans,
        num_classes=num_classes,
        embed_dim=embed_dim,
        depth=depth,
        num_heads=num_heads,
        mlp_ratio=mlp_ratio,
        qkv_bias=qkv_bias,
        drop_rate=drop_rate,
        attn_drop_rate=attn_drop_rate,
        drop_path_rate=drop_path_rate,
        global_pool=global_pool,
        **VIT_NORMS[norm],
    )
    if patch_embed_init_gain != 1.0:
        with torch.no_grad():
            model.patch_embed.proj.weight.mul_(patch_embed_init_gain)
    return model

