"""Masked autoencoder (He et al. 2022) on a torchvision ViT: the in-domain pretraining of the sizing backbone.

:class:`MaskedAutoencoder` hides a random ``mask_ratio`` of each image's patches, encodes the visible ones
with the ViT's own modules (patch embedding, class token, position embedding, encoder blocks, final norm),
and a light decoder (torchvision's ``Encoder``: learned positions, a few blocks, a norm) reconstructs every
patch from the encoded tokens and a shared mask token. The loss is the mean squared error over the hidden
patches (:func:`masked_patch_loss`), on raw pixels or on pixels normalised per patch. The ViT is trained in
place, so after pretraining it is the backbone in torchvision layout, ready for ``model.weights``.
"""

from __future__ import annotations

import torch
from torch import Tensor, nn
from torchvision.models.vision_transformer import Encoder, VisionTransformer

__all__ = ["MaskedAutoencoder", "masked_patch_loss", "patchify", "unpatchify"]


def patchify(images: Tensor, patch_size: int) -> Tensor:
    """(B, C, H, W) -> (B, N, p * p * C): row-major patches, each flattened as (p, p, C)."""
    b, c, h, w = images.shape
    p = patch_size
    x = images.reshape(b, c, h // p, p, w // p, p)
    return x.permute(0, 2, 4, 3, 5, 1).reshape(b, (h // p) * (w // p), p * p * c)


def unpatchify(patches: Tensor, patch_size: int, channels: int = 3) -> Tensor:
    """The inverse of :func:`patchify` for a square grid."""
    b, n, _ = patches.shape
    p, side = patch_size, round(n**0.5)
    x = patches.reshape(b, side, side, p, p, channels)
    return x.permute(0, 5, 1, 3, 2, 4).reshape(b, channels, side * p, side * p)


def masked_patch_loss(pred: Tensor, target: Tensor, mask: Tensor, normalize: bool = True) -> Tensor:
    """Per image (B,): the mean over its hidden patches (``mask`` 1) of the per-patch mean squared error.

    With ``normalize`` each target patch is standardised by its own mean and variance first (MAE's
    ``norm_pix_loss``); without it the loss keeps each patch's brightness and contrast.
    """
    if normalize:
        mean, var = target.mean(dim=-1, keepdim=True), target.var(dim=-1, keepdim=True)
        target = (target - mean) / (var + 1.0e-6).sqrt()
    per_patch = (pred.float() - target.float()).square().mean(dim=-1)
    return (per_patch * mask).sum(dim=1) / mask.sum(dim=1)


class MaskedAutoencoder(nn.Module):
    """A ViT encoder trained to reconstruct its hidden patches. ``forward(images)`` is each image's loss (B,).

    :meth:`reconstruct` gives ``pred`` (B, N, p * p * C), the reconstruction of every patch, and ``mask`` (B, N),
    1 where a patch was hidden from the encoder. In training the masks draw from the global RNG (seeded by the
    run); in eval mode from a generator seeded by ``eval_seed`` on every call, so validation losses compare.
    """

    def __init__(
        self,
        vit: VisionTransformer,
        mask_ratio: float = 0.75,
        decoder_dim: int = 128,
        decoder_depth: int = 2,
        decoder_heads: int = 4,
        normalize: bool = True,
        channels: int = 3,
        eval_seed: int = 0,
    ) -> None:
        super().__init__()
        if not 0.0 <= mask_ratio < 1.0:
            raise ValueError(f"mask_ratio must be in [0, 1), got {mask_ratio}")
        self.vit = vit
        self.mask_ratio = mask_ratio
        self.patch_size = vit.patch_size
        self.normalize = normalize
        self.eval_seed = eval_seed
        num_patches = (vit.image_size // vit.patch_size) ** 2
        self.decoder_embed = nn.Linear(vit.hidden_dim, decoder_dim)
        self.mask_token = nn.Parameter(torch.zeros(1, 1, decoder_dim))
        self.decoder = Encoder(num_patches + 1, decoder_depth, decoder_heads, decoder_dim, 4 * decoder_dim, 0.0, 0.0)
        self.decoder_pred = nn.Linear(decoder_dim, vit.patch_size**2 * channels)
        nn.init.normal_(self.mask_token, std=0.02)

    def visible_count(self, num_patches: int) -> int:
        return int(num_patches * (1.0 - self.mask_ratio))

    def encode(self, images: Tensor, keep: Tensor) -> Tensor:
        """The ViT's tokens (class token first) for the patches indexed by ``keep`` (B, K)."""
        vit = self.vit
        tokens = vit.conv_proj(images).flatten(2).transpose(1, 2)  # (B, N, D), as torchvision embeds patches
        pos = vit.encoder.pos_embedding
        tokens = tokens + pos[:, 1:]
        tokens = torch.gather(tokens, 1, keep.unsqueeze(-1).expand(-1, -1, tokens.shape[-1]))
        cls = (vit.class_token + pos[:, :1]).expand(tokens.shape[0], -1, -1)
        x = vit.encoder.dropout(torch.cat([cls, tokens], dim=1))
        return vit.encoder.ln(vit.encoder.layers(x))

    def decode(self, latent: Tensor, restore: Tensor) -> Tensor:
        """Per-patch pixel predictions from the encoded tokens, mask tokens in the hidden places."""
        x = self.decoder_embed(latent)
        b, n = restore.shape
        hidden = self.mask_token.expand(b, n - (x.shape[1] - 1), -1)
        patches = torch.cat([x[:, 1:], hidden], dim=1)  # visible first, in shuffled order
        patches = torch.gather(patches, 1, restore.unsqueeze(-1).expand(-1, -1, x.shape[-1]))
        x = self.decoder(torch.cat([x[:, :1], patches], dim=1))
        return self.decoder_pred(x[:, 1:])

    def reconstruct(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """``(pred, mask)``: every patch's reconstruction from a random visible share of the patches."""
        b = images.shape[0]
        n = (images.shape[-1] // self.patch_size) * (images.shape[-2] // self.patch_size)
        generator = None if self.training else torch.Generator(images.device).manual_seed(self.eval_seed)
        noise = torch.rand(b, n, device=images.device, generator=generator)
        shuffle = noise.argsort(dim=1)  # a random order of patches per image, the first ``keep`` visible
        restore = shuffle.argsort(dim=1)
        keep = self.visible_count(n)
        mask = torch.ones(b, n, device=images.device)
        mask[:, :keep] = 0.0
        mask = torch.gather(mask, 1, restore)  # 1 = hidden, in patch order
        return self.decode(self.encode(images, shuffle[:, :keep]), restore), mask

    @torch.no_grad()
    def pictures(self, images: Tensor) -> tuple[Tensor, Tensor]:
        """``(visible, reconstructed)`` images for a figure, in the units of ``images``: the visible patches with
        the hidden ones zero, and the visible patches with the predictions in the hidden places (predictions of
        normalised patches are put back in each patch's own mean and spread)."""
        pred, mask = self.reconstruct(images)
        target, hidden = patchify(images, self.patch_size), mask.unsqueeze(-1).bool()
        if self.normalize:
            mean, var = target.mean(dim=-1, keepdim=True), target.var(dim=-1, keepdim=True)
            pred = pred * (var + 1.0e-6).sqrt() + mean
        channels = images.shape[1]
        visible = unpatchify(target.masked_fill(hidden, 0.0), self.patch_size, channels)
        return visible, unpatchify(torch.where(hidden, pred.to(target.dtype), target), self.patch_size, channels)

    def forward(self, images: Tensor) -> Tensor:
        pred, mask = self.reconstruct(images)
        return masked_patch_loss(pred, patchify(images, self.patch_size), mask, self.normalize)
