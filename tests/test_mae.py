"""The masked autoencoder of fsg_endo.nn.mae against independent computations (numpy, torchvision's forward)."""

import numpy as np
import torch
from torchvision.models.vision_transformer import VisionTransformer

from fsg_endo.nn.mae import MaskedAutoencoder, masked_patch_loss, patchify, unpatchify


def tiny_vit() -> VisionTransformer:
    torch.manual_seed(0)
    return VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2, hidden_dim=32, mlp_dim=64)


def test_patchify_matches_a_loop_and_inverts():
    images = torch.randn(2, 3, 16, 24)
    patches = patchify(images, 8).numpy()
    x = images.numpy()
    expected = [
        [
            x[b, :, i * 8 : (i + 1) * 8, j * 8 : (j + 1) * 8].transpose(1, 2, 0).reshape(-1)
            for i in range(2)
            for j in range(3)
        ]
        for b in range(2)
    ]
    np.testing.assert_array_equal(patches, np.asarray(expected))
    square = torch.randn(2, 3, 16, 16)
    torch.testing.assert_close(unpatchify(patchify(square, 4), 4), square, rtol=0, atol=0)


def test_loss_against_numpy_and_only_on_hidden_patches():
    rng = np.random.default_rng(0)
    pred, target = rng.normal(size=(2, 5, 12)), rng.normal(size=(2, 5, 12))
    mask = np.array([[1, 0, 1, 0, 0], [0, 1, 1, 1, 0]], dtype=float)
    raw = ((pred - target) ** 2).mean(-1)
    norm_t = (target - target.mean(-1, keepdims=True)) / np.sqrt(target.var(-1, ddof=1, keepdims=True) + 1e-6)
    normed = ((pred - norm_t) ** 2).mean(-1)
    args = [torch.tensor(a, dtype=torch.float64) for a in (pred, target, mask)]
    np.testing.assert_allclose(masked_patch_loss(*args, normalize=False), (raw * mask).sum(1) / mask.sum(1))
    np.testing.assert_allclose(masked_patch_loss(*args, normalize=True), (normed * mask).sum(1) / mask.sum(1))
    changed = args[0].clone()
    changed[mask == 0] += 5.0  # predictions of visible patches do not count
    torch.testing.assert_close(masked_patch_loss(changed, *args[1:]), masked_patch_loss(*args))


def test_encoder_without_masking_equals_torchvision_forward():
    vit = tiny_vit().eval()
    mae = MaskedAutoencoder(vit, mask_ratio=0.0).eval()
    images = torch.randn(3, 3, 32, 32)
    keep = torch.arange(16).expand(3, -1)
    features = mae.encode(images, keep)[:, 0]
    vit.heads = torch.nn.Identity()
    torch.testing.assert_close(features, vit(images))


def test_masking_hides_the_ratio_and_the_encoder_never_sees_hidden_patches():
    mae = MaskedAutoencoder(tiny_vit(), mask_ratio=0.75).train()
    images = torch.randn(4, 3, 32, 32)
    torch.manual_seed(1)
    pred, mask = mae.reconstruct(images)
    assert pred.shape == (4, 16, 8 * 8 * 3) and mask.shape == (4, 16)
    assert (mask.sum(1) == 12).all()
    hidden = unpatchify(mask.unsqueeze(-1).expand(-1, -1, 8 * 8 * 3), 8).bool()
    noisy = torch.where(hidden, torch.randn_like(images) * 10, images)
    torch.manual_seed(1)
    pred_noisy, mask_noisy = mae.reconstruct(noisy)
    torch.testing.assert_close(mask_noisy, mask)
    torch.testing.assert_close(pred_noisy, pred)
    assert not torch.equal(mae.reconstruct(images)[1], mask)  # training: another draw hides other patches
    mae.eval()
    torch.testing.assert_close(mae(images), mae(images))  # eval: the same masks on every call
    pred, mask = mae.reconstruct(images)
    torch.testing.assert_close(mae(images), masked_patch_loss(pred, patchify(images, 8), mask))


def test_pictures_keep_visible_patches_and_put_predictions_back_in_pixel_units():
    mae = MaskedAutoencoder(tiny_vit(), mask_ratio=0.5).eval()
    images = torch.rand(2, 3, 32, 32)
    visible, reconstructed = mae.pictures(images)
    with torch.no_grad():
        pred, mask = mae.reconstruct(images)
    hidden = unpatchify(mask.unsqueeze(-1).expand(-1, -1, 8 * 8 * 3), 8).bool()
    torch.testing.assert_close(visible, torch.where(hidden, 0.0, images))
    torch.testing.assert_close(reconstructed[~hidden], images[~hidden])
    target = patchify(images, 8).numpy()
    by_hand = pred.numpy() * np.sqrt(target.var(-1, ddof=1, keepdims=True) + 1e-6) + target.mean(-1, keepdims=True)
    np.testing.assert_allclose(
        patchify(reconstructed, 8).numpy()[mask.numpy() == 1], by_hand[mask.numpy() == 1], rtol=1e-5, atol=1e-6
    )


def test_a_few_steps_lower_the_reconstruction_loss():
    mae = MaskedAutoencoder(tiny_vit(), mask_ratio=0.5, decoder_dim=32, decoder_depth=1, decoder_heads=2)
    images = torch.rand(8, 3, 32, 32)
    opt = torch.optim.Adam(mae.parameters(), lr=3e-3)
    losses = []
    mae.normalize = False
    for _ in range(30):
        loss = mae(images).mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert np.mean(losses[-5:]) < 0.5 * np.mean(losses[:5])
