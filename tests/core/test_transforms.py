import numpy as np
import torch

from cleanbackdoor.data.transforms import Augment, channel_stats, to_tensor, to_uint8


def _reference_crop(img: np.ndarray, dy: int, dx: int, p: int) -> np.ndarray:
    """Random crop with zero padding, written the textbook way: pad by p, then take the window at (p-dy, p-dx)."""
    c, h, w = img.shape
    padded = np.zeros((c, h + 2 * p, w + 2 * p), img.dtype)
    padded[:, p:p + h, p:p + w] = img
    return padded[:, p - dy:p - dy + h, p - dx:p - dx + w]


def test_crop_equals_pad_then_crop():
    x = torch.rand(16, 3, 8, 8)
    aug = Augment(crop_padding=3, hflip=False)
    g = torch.Generator().manual_seed(0)
    draw = aug.draw(16, g)
    out = aug.apply(x, draw)
    for i in range(16):
        ref = _reference_crop(x[i].numpy(), int(draw.dy[i]), int(draw.dx[i]), 3)
        assert np.allclose(out[i].numpy(), ref)


def test_flip_and_draw_reuse():
    x = torch.rand(32, 1, 6, 6)
    aug = Augment(crop_padding=0, hflip=True)
    draw = aug.draw(32, torch.Generator().manual_seed(1))
    out = aug.apply(x, draw)
    assert 0 < int(draw.flip.sum()) < 32
    for i in range(32):
        assert torch.equal(out[i], x[i].flip(-1) if draw.flip[i] else x[i])
    assert torch.equal(out, aug.apply(x, draw))  # the same draw applied twice gives the same batch


def test_identity_and_seeded():
    x = torch.rand(4, 3, 8, 8)
    assert Augment()(x, torch.Generator()) is x
    a = Augment(2, True)
    assert torch.equal(a(x, torch.Generator().manual_seed(5)), a(x, torch.Generator().manual_seed(5)))


def test_tensor_round_trip_and_stats():
    imgs = np.random.default_rng(0).integers(0, 256, (3, 5, 7, 3)).astype(np.uint8)
    t = to_tensor(imgs)
    assert t.shape == (3, 3, 5, 7) and t.dtype == torch.float32 and float(t.max()) <= 1
    assert np.array_equal(to_uint8(t), imgs)
    mean, std = channel_stats(imgs)
    assert np.allclose(mean, imgs.reshape(-1, 3).mean(0) / 255)
    assert np.allclose(std, imgs.reshape(-1, 3).std(0) / 255)
