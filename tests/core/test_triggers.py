import numpy as np
import pytest

from cleanbackdoor.errors import ConfigError, DataError
from cleanbackdoor.triggers import TRIGGERS, build_trigger


@pytest.fixture
def images():
    return np.random.default_rng(0).integers(20, 236, (5, 32, 32, 3)).astype(np.uint8)


@pytest.mark.parametrize("name", sorted(TRIGGERS))
def test_trigger_changes_images_and_is_deterministic(name, images):
    t = build_trigger(name, (3, 32, 32), seed=3)
    out = t(images)
    assert out.shape == images.shape and out.dtype == np.uint8
    assert (out != images).any(axis=(1, 2, 3)).all()
    assert np.array_equal(out, build_trigger(name, (3, 32, 32), seed=3)(images))
    assert np.array_equal(images, np.random.default_rng(0).integers(20, 236, (5, 32, 32, 3)).astype(np.uint8))


@pytest.mark.parametrize("name", sorted(TRIGGERS))
@pytest.mark.parametrize("shape", [(1, 8, 8), (1, 28, 28)])
def test_trigger_scales_to_small_grey_images(name, shape):
    x = np.full((2, shape[1], shape[2], 1), 128, np.uint8)
    out = build_trigger(name, shape)(x)
    assert (out != x).any()


def test_sinusoidal_matches_flip_formula(images):
    out = build_trigger("sinusoidal", (3, 32, 32))(images)
    wave = 6 * np.sin(np.linspace(0, 16 * np.pi, 32))
    expected = np.clip(np.rint(images.astype(np.float64) + wave[None, None, :, None]), 0, 255)
    assert np.abs(out.astype(np.float64) - expected).max() <= 1


def test_patch_positions_and_size():
    x = np.zeros((1, 32, 32, 3), np.uint8)
    out = build_trigger("patch", (3, 32, 32), pattern="white", size=4, position="top-left", margin=0)(x)
    assert out[0, :4, :4].min() == 255 and out[0, 4:, :].max() == 0 and out[0, :, 4:].max() == 0
    out = build_trigger("patch", (3, 32, 32), pattern="white", size=3, position=(10, 20))(x)
    assert np.argwhere(out[0, :, :, 0]).min(0).tolist() == [10, 20]
    assert build_trigger("patch", (1, 8, 8)).size == 2
    assert build_trigger("patch", (3, 32, 32)).size == 3


def test_random_patch_positions_vary_but_repeat():
    x = np.zeros((20, 32, 32, 3), np.uint8)
    t = build_trigger("patch", (3, 32, 32), pattern="white", position="random", seed=1)
    out = t(x)
    corners = {tuple(np.argwhere(o[:, :, 0]).min(0)) for o in out}
    assert len(corners) > 5
    assert np.array_equal(out, t(x))


def test_turner_touches_only_corners():
    x = np.full((1, 32, 32, 3), 128, np.uint8)
    out = build_trigger("turner", (3, 32, 32))(x)
    changed = (out != x).any(-1)[0]
    assert changed[:3, :3].any() and changed[-3:, -3:].any() and changed[:3, -3:].any() and changed[-3:, :3].any()
    changed[:3, :3] = changed[:3, -3:] = changed[-3:, :3] = changed[-3:, -3:] = False
    assert not changed.any()


def test_bad_parameters_are_clear_errors():
    with pytest.raises(ConfigError, match="unknown trigger 'sparkle'"):
        build_trigger("sparkle", (3, 32, 32))
    with pytest.raises(ConfigError, match="has no parameter 'colour'"):
        build_trigger("patch", (3, 32, 32), colour="red")
    with pytest.raises(ConfigError, match="patch size"):
        build_trigger("patch", (3, 32, 32), size=40)
    with pytest.raises(ConfigError, match="alpha"):
        build_trigger("blend", (3, 32, 32), alpha=1.5)
    with pytest.raises(ConfigError, match="does not fit"):
        build_trigger("patch", (3, 32, 32), position=(31, 31))
    with pytest.raises(DataError, match="built for"):
        build_trigger("patch", (3, 32, 32))(np.zeros((1, 8, 8, 1), np.uint8))
