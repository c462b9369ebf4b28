import json
import random
import tarfile

from nxtrec.data.synth import CATEGORIES, generate, glyph_image, render_scene


def test_categories_are_many_everyday_nouns_with_glyphs():
    names = [c.name for c in CATEGORIES]
    assert len(set(names)) == len(names) >= 100
    assert {"dog", "apple", "car", "tree", "umbrella"} <= set(names)
    for c in CATEGORIES:
        g = glyph_image(c.glyph)
        assert g.mode == "RGBA" and min(g.size) > 10, c.name


def test_scenes_are_deterministic_and_captions_name_the_objects():
    a = [render_scene(random.Random(5), 128) for _ in range(1)][0]
    b = render_scene(random.Random(5), 128)
    assert a[1] == b[1] and list(a[0].getdata()) == list(b[0].getdata())
    rng = random.Random(0)
    for _ in range(30):
        img, caption, objects = render_scene(rng, 128)
        assert img.size == (128, 128) and 1 <= len(objects) <= 6
        assert caption[0].isupper() and caption.endswith(".")
        words = caption.lower()
        for name in {o.name for o in objects}:
            cat = next(c for c in CATEGORIES if c.name == name)
            assert any(w in words for w in (cat.name, cat.plural, *cat.synonyms)), (caption, name)


def test_generate_packs_train_and_validation_shards(tmp_path):
    summaries = generate(tmp_path / "s", n=12, seed=1, n_val=4, size=96, shard_size=5, progress=False)
    assert summaries["train"].written == 12 and summaries["val"].written == 4
    shards = sorted((tmp_path / "s" / "train").glob("*.tar"))
    assert len(shards) == 3
    with tarfile.open(shards[0]) as tf:
        metas = [json.load(tf.extractfile(m)) for m in tf.getmembers() if m.name.endswith(".json")]
    assert all(m["labels"] and m["objects"] and m["split"] == "train" for m in metas)
    # the validation split does not depend on the training size
    again = generate(tmp_path / "t", n=3, seed=1, n_val=4, size=96, shard_size=5, progress=False)
    a = (tmp_path / "s" / "val" / "000000.tar").read_bytes()
    assert again["val"].written == 4 and a == (tmp_path / "t" / "val" / "000000.tar").read_bytes()


def test_generate_keeps_each_object_box_in_the_metadata(tmp_path):
    generate(tmp_path / "s", n=0, seed=2, n_val=6, size=96, progress=False)
    with tarfile.open(tmp_path / "s" / "val" / "000000.tar") as tf:
        metas = [json.load(tf.extractfile(m)) for m in tf.getmembers() if m.name.endswith(".json")]
    rng = random.Random("val-2")  # the held-out stream: the same scenes, drawn again
    for meta in metas:
        _, _, objects = render_scene(rng, 96)
        assert [b["object"] for b in meta["boxes"]] == [o.name for o in objects]
        assert {b["object"] for b in meta["boxes"]} == set(meta["objects"])
        for b, o in zip(meta["boxes"], objects):
            x0, y0, x1, y1 = b["box"]
            assert 0 <= x0 < x1 <= 96 and 0 <= y0 < y1 <= 96
            assert (x0, y0, x1, y1) == (max(0, o.box[0]), max(0, o.box[1]), min(96, o.box[2]), min(96, o.box[3]))
