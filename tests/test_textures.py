"""The second drawn domain (textures told apart by hue): deterministic, distinct, writable."""

import numpy as np
import pytest

from edgevit_export.calibration import shapes, textures
from edgevit_export.calibration.shapes import DOMAINS, domain_module, shapes_arrays, write_shapes


def test_domains_lookup():
    assert DOMAINS["shapes"] is shapes and DOMAINS["textures"] is textures
    assert domain_module("textures") is textures
    with pytest.raises(ValueError, match="unknown drawn domain"):
        domain_module("nope")


def test_classes_sorted_and_draw_is_deterministic():
    assert list(textures.CLASSES) == sorted(textures.CLASSES) and len(set(textures.CLASSES)) == 10
    a = np.asarray(textures.draw("h03", 40, seed=5, index=3))
    b = np.asarray(textures.draw("h03", 40, seed=5, index=3))
    assert a.shape == (40, 40, 3) and a.dtype == np.uint8
    assert np.array_equal(a, b)
    assert not np.array_equal(a, np.asarray(textures.draw("h03", 40, seed=6, index=3)))
    assert not np.array_equal(a, np.asarray(textures.draw("h03", 40, seed=5, index=4)))
    with pytest.raises(ValueError, match="unknown texture class"):
        textures.draw("circle", 40)


def test_classes_draw_different_images():
    imgs = [np.asarray(textures.draw(c, 32, seed=1, index=0)) for c in textures.CLASSES]
    for i in range(len(imgs)):
        for j in range(i + 1, len(imgs)):
            assert not np.array_equal(imgs[i], imgs[j]), (textures.CLASSES[i], textures.CLASSES[j])


def test_hue_is_the_class():
    """The most saturated pixels' hue lies in the class's own 36° bin (up to the colour cast) for most
    saturated inks; faint inks (half of them) compete with the background's tint. Chance: ~6 of 40."""
    import colorsys

    hits = 0
    for k, cls in enumerate(textures.CLASSES):
        for i in range(4):
            px = np.asarray(textures.draw(cls, 48, seed=0, index=i), np.float32).reshape(-1, 3) / 255
            sat = px.max(1) - px.min(1)
            top = px[sat >= np.quantile(sat, 0.97)].mean(0)
            h = colorsys.rgb_to_hsv(*top)[0] * 360
            err = abs((h - k * textures.STEP + 180) % 360 - 180)
            hits += err < textures.STEP / 2 + 8
    assert hits >= 18, hits


def test_writer_and_arrays_take_a_domain(tmp_path):
    s = write_shapes(tmp_path / "t", 2, size=24, seed=3, domain="textures")
    assert s.domain == "textures" and s.count == 20
    assert sorted(p.name for p in (tmp_path / "t").iterdir()) == list(textures.CLASSES)
    assert all(len(list((tmp_path / "t" / c).glob("*.png"))) == 2 for c in textures.CLASSES)
    x, y = shapes_arrays(2, size=24, seed=3, domain="textures")
    assert x.shape == (20, 24, 24, 3) and list(y) == [k for k in range(10) for _ in range(2)]
    assert np.array_equal(x[0], np.asarray(textures.draw(textures.CLASSES[0], 24, 3, 0)))
    # the default domain is still the shapes
    xs, _ = shapes_arrays(1, size=24, seed=3)
    assert np.array_equal(xs[0], np.asarray(shapes.draw(shapes.CLASSES[0], 24, 3, 0)))
    with pytest.raises(ValueError):
        write_shapes(tmp_path / "u", 1, size=24, domain="nope")
