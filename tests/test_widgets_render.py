"""tracin_widgets.render: images / text / tabular rows -> tile views; labels -> text; static HTML and figure."""

from __future__ import annotations

import io

import numpy as np
import pytest
import torch
from PIL import Image

from tracin_widgets._static import strips_figure, strips_html
from tracin_widgets.render import THUMB_PX, Renderer


def decode(png: bytes) -> np.ndarray:
    return np.asarray(Image.open(io.BytesIO(png)))


def test_float_chw_in_unit_range_is_scaled_by_255():
    x = torch.rand(1, 8, 8)
    px = decode(Renderer().view(x).png)
    assert px.shape == (8, 8)
    np.testing.assert_array_equal(px, np.floor(x[0].numpy() * 255 + 0.5).astype(np.uint8))


def test_rgb_chw_and_hwc_give_the_same_image():
    x = torch.rand(3, 5, 7)
    a = decode(Renderer().view(x).png)
    b = decode(Renderer().view(x.permute(1, 2, 0).numpy()).png)
    assert a.shape == (5, 7, 3)
    np.testing.assert_array_equal(a, b)


def test_uint8_numpy_is_kept_exactly():
    x = np.arange(64, dtype=np.uint8).reshape(8, 8) * 3
    np.testing.assert_array_equal(decode(Renderer().view(x).png), x)


def test_other_float_ranges_are_min_max_scaled():
    x = torch.linspace(-2.0, 5.0, 16).reshape(4, 4)
    px = decode(Renderer().view(x).png)
    assert px.min() == 0 and px.max() == 255
    assert px[0, 0] == 0 and px[-1, -1] == 255


def test_pil_images_pass_through_and_large_images_shrink():
    big = Image.new("RGB", (400, 200), (10, 200, 30))
    px = decode(Renderer().view(big).png)
    assert px.shape == (THUMB_PX // 2, THUMB_PX, 3)
    assert tuple(px[0, 0]) == (10, 200, 30)
    assert decode(Renderer().view(big, max_px=320).png).shape == (160, 320, 3)


def test_text_is_truncated_in_tiles_and_kept_whole_for_the_detail():
    s = "<b>great</b> movie & " + "x" * 300
    v = Renderer(max_chars=40).view(s)
    assert v.png is None and len(v.text) == 40 and v.text.endswith("\u2026")
    assert v.full_text == s
    assert v.text.startswith("<b>great</b>")            # raw; the browser sets textContent, HTML escapes


def test_tabular_rows_use_feature_names():
    r = Renderer(feature_names=["age", "income", "score"], max_features=2)
    v = r.view(torch.tensor([31.0, 52000.0, 0.25]))
    assert v.text.splitlines() == ["age = 31", "income = 5.2e+04", "\u2026"]
    assert v.rows == (("age", "31"), ("income", "5.2e+04"), ("score", "0.25"))
    assert Renderer().view(np.array([1, 2])).rows == (("x0", "1"), ("x1", "2"))


def test_render_override_and_labels():
    r = Renderer(render=lambda x: f"tokens {x.tolist()}", class_names=["neg", "pos"])
    assert r.view(torch.tensor([3, 4])).text == "tokens [3, 4]"
    assert Renderer(render=lambda x: {"a": 1}).view(None).rows == (("a", "1"),)
    assert r.label(torch.tensor(1)) == "pos"
    assert r.label(5) == "5"                            # outside class_names: the number
    assert r.label(None) == ""
    assert r.label(torch.tensor(2.5)) == "2.5"
    assert r.label(np.int64(0)) == "neg"


def _strips():
    png = Renderer().view(torch.rand(1, 8, 8)).png
    tiles = [{"index": 4, "role": "train", "pinned": False, "label": "<7>", "pred": "1", "score": 0.5,
              "alt": "training example 4, label <7>", "png": png, "text": None},
             {"index": 9, "role": "train", "pinned": False, "label": "2", "pred": None, "score": -0.25,
              "alt": "training example 9, label 2", "png": None, "text": "<script>alert(1)</script>"}]
    return [{"key": "pro", "title": "proponents", "note": "n", "scale": 0.5, "tiles": tiles}]


def test_static_html_has_indices_alt_text_scores_and_escapes():
    html = strips_html(_strips(), title="t")
    assert 'data-index="4"' in html and 'data-index="9"' in html
    assert 'alt="training example 4, label &lt;7&gt;"' in html
    assert "data:image/png;base64," in html
    assert "+0.5" in html and "-0.25" in html
    assert "<script>" not in html and "&lt;script&gt;" in html


def test_static_figure_has_one_axis_per_tile():
    from matplotlib.figure import Figure

    fig = strips_figure(_strips())
    assert isinstance(fig, Figure)
    titles = [ax.get_title() for ax in fig.axes]
    assert titles == ["#4 <7>\n+0.5", "#9 2\n-0.25"]


@pytest.mark.parametrize("bad", [np.zeros((1, 1)), np.zeros((2, 3, 5, 5))])
def test_non_image_arrays_fall_back_to_a_table(bad):
    v = Renderer().view(bad)
    assert v.png is None and v.text
