"""The Gallery's trait schema is written once (tracin_widgets/_schema.py): gallery.js and the galleries agree with it."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

import tracin_widgets as tw
from tracin_widgets import _schema
from tracin_widgets._gallery import Gallery

JS = (Path(tw.__file__).parent / "static" / "gallery.js").read_text()


def _js_names(pattern: str) -> set[str]:
    return set(re.findall(pattern, JS))


def test_gallery_declares_exactly_the_schema_traits():
    synced = {n for n in Gallery.class_trait_names(sync=True)} - set(Gallery.__mro__[1].class_trait_names(sync=True))
    assert synced == set(_schema.TRAITS)


def test_gallery_js_reads_and_writes_only_schema_traits_and_all_of_them():
    read = _js_names(r'model\.get\("(\w+)"\)') | _js_names(r'"change:(\w+)"')
    written = _js_names(r'model\.set\("(\w+)"')
    assert read == set(_schema.TRAITS)
    assert written <= set(_schema.TRAITS) and written == {"selected", "active"}


@pytest.mark.parametrize("var, fields", [("t", _schema.TILE_FIELDS), ("s", _schema.STRIP_FIELDS),
                                         ("d", _schema.DETAIL_FIELDS), ("sc", _schema.SCATTER_FIELDS)])
def test_gallery_js_uses_exactly_the_schema_fields(var, fields):
    used = _js_names(rf"\b{var}\.(\w+)\b") - {"length", "forEach"}
    if var == "s":
        used |= _js_names(r"\bstrip\.(\w+)\b")
    assert used == set(fields), (used ^ set(fields))


def test_gallery_js_sends_exactly_the_schema_messages():
    assert _js_names(r'action: "(\w+)"') == set(_schema.MESSAGES)


def test_what_the_galleries_build_fits_the_schema(cnn_index, small_digits):
    ex = tw.InfluenceExplorer(cnn_index, small_digits.train, small_digits.test, k=3, embeddings=True)
    out = tw.SelfInfluenceGallery(cnn_index, small_digits.train, page_size=6, class_names=small_digits.class_names)
    cl = tw.ClusterGallery(cnn_index, small_digits.train, n_clusters=3, per_cluster=3)
    for g in (ex, out, cl):
        for s in g.gallery.strips:
            _schema.check_fields("strip", s)
            for t in s["tiles"]:
                _schema.check_fields("tile", t)
                assert set(t) == set(_schema.TILE_FIELDS)
        g.gallery.active = g.gallery.strips[-1]["tiles"][0]["index"]
        _schema.check_fields("detail", g.gallery.detail)
        assert g.last_error is None
    _schema.check_fields("scatter", out.gallery.scatter)
    with pytest.raises(AssertionError, match="not in tracin_widgets._schema"):
        _schema.check_fields("tile", {"index": 1, "colour": "red"})
