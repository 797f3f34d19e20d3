"""A small Vision Transformer (Dosovitskiy et al. 2021, "An image is worth 16x16 words") built from
PyTorch's own modules, so it is a model "from the wild" for compression: ``nn.Conv2d`` patch
embedding, ``nn.Embedding`` positions, ``nn.TransformerEncoderLayer`` blocks (with
``nn.MultiheadAttention``), a LayerNorm and a Linear head."""

from __future__ import annotations

import torch
from torch import nn

__all__ = ["VisionTransformer", "vit_tiny"]


class VisionTransformer(nn.Module):
    """ViT with pre-norm blocks and a mean-pooled token head (no class token).

    Parameters
    ----------
    image_size, patch_size : int
        Square images split into ``(image_size / patch_size)^2`` patches.
    dim, depth, heads, mlp_dim : int
        Token width, number of encoder blocks, attention heads, feed-forward width.
    in_channels, num_classes : int
    dropout : float
    """

    def __init__(self, image_size: int = 32, patch_size: int = 8, dim: int = 128, depth: int = 4, heads: int = 4,
                 mlp_dim: int = 256, in_channels: int = 3, num_classes: int = 10, dropout: float = 0.0):
        super().__init__()
        if image_size % patch_size:
            raise ValueError(f"patch_size ({patch_size}) must divide image_size ({image_size})")
        self.image_size, self.patch_size = image_size, patch_size
        self.num_patches = (image_size // patch_size) ** 2
        self.patch_embed = nn.Conv2d(in_channels, dim, patch_size, stride=patch_size)
        self.position = nn.Embedding(self.num_patches, dim)
        block = nn.TransformerEncoderLayer(dim, heads, mlp_dim, dropout, activation="gelu", batch_first=True,
                                           norm_first=True)
        self.encoder = nn.TransformerEncoder(block, depth, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, num_classes)
        self.register_buffer("positions", torch.arange(self.num_patches), persistent=False)
        nn.init.normal_(self.position.weight, std=0.02)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.ndim != 4 or x.shape[-2:] != (self.image_size, self.image_size):
            raise ValueError(f"expected images (N, C, {self.image_size}, {self.image_size}), got {tuple(x.shape)}")
        tokens = self.patch_embed(x).flatten(2).transpose(1, 2).contiguous()  # (N, patches, dim)
        tokens = tokens + self.position(self.positions)
        return self.head(self.norm(self.encoder(tokens)).mean(dim=1))


def vit_tiny(in_channels: int = 3, num_classes: int = 10, **kwargs) -> VisionTransformer:
    """ViT for 32x32 images: 8x8 patches (16 tokens), width 128, 4 blocks of 4 heads, MLP 256
    (about 0.56 M parameters); trains on CIFAR-10 in CPU minutes per epoch."""
    return VisionTransformer(in_channels=in_channels, num_classes=num_classes, **kwargs)
