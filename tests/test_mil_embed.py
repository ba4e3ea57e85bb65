"""histodist.embed over tile shards of whole slides (the tiler's format, built from real PCam
patches by tilekit): every embedding keeps its tile's slide id and position, in the tiles'
order, the manifest lists each slide's tiles (shard, start, count), a slide's bag reads back
from that index alone, and the run records its throughput."""

from __future__ import annotations

import json
import tarfile

import pytest
import torch
from tilekit import TileSlide, tile_shards

from histodist import embed
from histodist.data import bags, embeddings
from histodist.data.loader import eval_loader

SLIDES = [  # 15 train tiles per shard: s1 spans shards 0 and 1, s3 is alone in shard 2
    TileSlide("s0", "train", 0, 6, patient="p0"),
    TileSlide("s1", "train", 1, 12, 3, patient="p0"),
    TileSlide("s2", "train", 0, 9, patient="p1"),
    TileSlide("s3", "train", 1, 5, 1),
    TileSlide("s4", "valid", 1, 7, 2, patient="p2"),
]


@pytest.fixture(scope="module")
def tiles(tmp_path_factory, pcam_jpeg):
    """(folder, manifest) of the tile shards."""
    out = tmp_path_factory.mktemp("wsi") / "tiles"
    return out, tile_shards(out, pcam_jpeg, SLIDES, 15)


def _members(folder, ext: str) -> list[tuple[str, bytes]]:
    """(key, bytes) of every member with that extension, in shard then tar order."""
    out = []
    for tar in sorted(folder.glob("*.tar")):
        with tarfile.open(tar) as t:
            out += [(m.name.split(".", 1)[0], t.extractfile(m).read()) for m in t
                    if m.name.endswith("." + ext)]  # fmt: skip
    return out


def test_embed_keeps_tile_positions_and_indexes_every_slide(tiles, tmp_path, capsys):
    src, tile_m = tiles
    emb = tmp_path / "emb"
    argv = ["--model", "vit_tiny_patch16_224", "--image-size", "32", "--shards", str(src),
            "--out", str(emb), "--workers", "0", "--batch-size", "8"]  # fmt: skip
    assert embed.main(argv) == 0
    out = capsys.readouterr().out
    m = json.loads((emb / "manifest.json").read_text())

    # every sample keeps its tile JSON's slide fields, in the same order as the tile shards
    tile_json = {k: json.loads(v) for k, v in _members(src, "json")}
    emb_json = _members(emb, "json")
    assert [k for k, _ in emb_json] == [k for k, _ in _members(src, "json")]
    for key, raw in emb_json:
        meta, want = json.loads(raw), tile_json[key]
        kept = {f: want[f] for f in embeddings.TILE_FIELDS if f in want}
        assert meta == {"group": want["group"], **kept} and len(kept) == 7

    # the per-slide index: the tiler's (name, start, count), plus offsets; labels, patients
    assert set(m["slides"]) == {s.id for s in SLIDES} and m["tiling"]["tile_size"] == 96
    for s in SLIDES:
        e, want = m["slides"][s.id], tile_m["slides"][s.id]
        assert [(p["name"], p["start"], p["count"]) for p in e["shards"]] == [
            (p["name"], p["start"], p["count"]) for p in want["shards"]
        ]
        assert (e["split"], e["label"], e["patient"], e["tiles"]) == (s.split, s.label,
                                                                       s.patient, s.tiles)  # fmt: skip
        assert e["label_source"] == "manifest" and e["width"] == want["width"]
    assert len(m["slides"]["s1"]["shards"]) == 2

    # a bag read through the index equals the slide's tiles read by scanning the whole set
    scan: dict[str, list] = {}
    for split in ("train", "valid"):
        for b in eval_loader(str(emb), split, batch_size=4, rank=0, world_size=1, workers=0):
            for vec, meta in zip(b["image"], b["meta"], strict=True):
                scan.setdefault(meta["slide"], []).append((vec.flatten(), meta))
    for split in ("train", "valid"):
        for slide in bags.slides(m, split):
            bag = bags.read_bag(str(emb), slide)
            want = scan[slide.id]
            assert bag.features.dtype == torch.float16 and len(bag.features) == slide.tiles
            assert torch.equal(bag.features, torch.stack([v for v, _ in want]))
            assert bag.coords().tolist() == [[t["x"], t["y"]] for _, t in want]
            assert (bag.extents() == 192).all()

    # throughput: in the manifest and on the last line
    t = m["throughput"]
    assert t["tiles"] == 39 and t["tiles_per_s"] > 0 and t["processes"] == 1
    assert "tiles/s" in out

    # a re-run reuses every shard and still writes the index (from the shard records)
    assert embed.main(argv) == 0
    again = json.loads((emb / "manifest.json").read_text())
    assert again["slides"] == m["slides"] and again["throughput"]["reused"] == 39


def test_a_slide_in_pieces_or_in_two_splits_is_refused():
    import io

    import numpy as np

    from histodist.data.remote import ShardError

    vec = np.zeros(4, np.float32)
    with tarfile.open(fileobj=io.BytesIO(), mode="w") as tar:
        w = embeddings.ShardWriter(tar, 2)
        for key, slide in (("a0", "a"), ("a1", "a"), ("b0", "b"), ("a2", "a")):
            if key == "a2":
                with pytest.raises(ShardError, match="slide a are not consecutive"):
                    w.add(key, vec, 1, {"slide": slide})
            else:
                w.add(key, vec, 1, {"slide": slide})
    assert [(r["slide"], r["start"], r["count"]) for r in w.runs] == [("a", 0, 2), ("b", 2, 1)]
    run = {**w.runs[0], "bytes": 1}
    records = {"train": [{"name": "t.tar", "slides": [run]}],
               "valid": [{"name": "v.tar", "slides": [run]}]}  # fmt: skip
    with pytest.raises(ShardError, match="splits train and valid"):
        bags.slide_index(records, {}, 2)
