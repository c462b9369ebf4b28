"""The dataset registry, shard lengths and the streaming loader, on real shards read by real
DataLoaders with worker processes."""

from __future__ import annotations

import json
import tarfile
from collections import Counter
from pathlib import Path

import datagen
import pytest
import torch
import webdataset as wds

from nxtrec.cli.main import main
from nxtrec.data import loader as data_loader
from nxtrec.data import registry, sharding
from nxtrec.data.pack import PackOptions, pack
from nxtrec.data.relabel import add_labels
from nxtrec.data.sources import coco_records
from nxtrec.errors import NxtrecError
from nxtrec.model.image import load_image, preprocess

N_IMAGES = 23  # packed in shards of 5: 5, 5, 5, 5, 3 samples for 2 ranks x 2 workers


@pytest.fixture(scope="module")
def coco(tmp_path_factory) -> Path:
    root = tmp_path_factory.mktemp("coco")
    images, captions = datagen.make_coco(root / "raw", N_IMAGES, no_noun=(5,))
    pack(coco_records(images, captions), root / "shards", "coco", "val2017", PackOptions(shard_size=5), progress=False)
    return root / "shards"


ALL_KEYS = sorted(f"{i + 1:012d}" for i in range(N_IMAGES))


def loader(shards, **kw):
    kw.setdefault("batch_size", 3)
    kw.setdefault("image_size", 32)
    kw.setdefault("num_workers", 2)
    return data_loader.build_loader(str(shards), **kw)


def run_epoch(ld) -> list[data_loader.ShardBatch]:
    return list(ld)


def keys_of(batches) -> list[str]:
    return [k for b in batches for k in b.keys]


def write_raw_shard(path: Path, samples: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with wds.TarWriter(str(path), encoder=False) as w:
        for s in samples:
            w.write(s)


def labelled(key: str, labels, seed: int, image: bytes | None = None) -> dict:
    meta = {"caption": f"caption {key}", "labels": labels}
    return {"__key__": key, "jpg": image or datagen.image_bytes(seed), "txt": meta["caption"].encode(),
            "json": json.dumps(meta).encode()}  # fmt: skip


# ---------------------------------------------------------------------------- the plan


@pytest.mark.parametrize("balance", sharding.BALANCE_MODES)
def test_plan_gives_every_position_once(balance):
    """Pure arithmetic, many sizes: the (rank, worker) ranges cut from uneven shards."""
    for lengths in ([5, 5, 5, 5, 3], [1], [7, 1, 2], [3, 3]):
        pieces = [sharding.Piece(f"s{i}", 0, n) for i, n in enumerate(lengths)]
        everything = [(p.path, j) for p in pieces for j in range(p.stop)]
        total = len(everything)
        for world in (1, 2, 3, 4, 8):
            for workers in (1, 2, 3):
                seen, flagged, per_rank = [], [], []
                for rank in range(world):
                    lo, hi = sharding.rank_range(total, rank, world, balance)
                    count = 0
                    for worker in range(workers):
                        for piece in sharding.cut_sequence(pieces, *sharding.worker_range(lo, hi, worker, workers)):
                            items = [(piece.path, j) for j in range(piece.start, piece.stop)]
                            (flagged if piece.padded else seen).extend(items)
                            count += len(items)
                    per_rank.append(count)
                if balance == "exact":
                    assert sorted(seen) == sorted(everything) and not flagged
                    assert max(per_rank) - min(per_rank) <= 1
                elif balance == "drop":
                    assert len(set(seen)) == len(seen) == world * (total // world) and not flagged
                    assert set(per_rank) == {total // world}
                else:
                    assert sorted(seen) == sorted(everything)
                    assert set(per_rank) == {-(-total // world)}
                    assert len(flagged) == world * -(-total // world) - total


def test_weights_repeat_or_cut_a_dataset():
    a = [registry.Shard("a0", 4, 4), registry.Shard("a1", 2, 2)]
    b = [registry.Shard("b0", 10, 10)]
    pieces = sharding.epoch_sequence([(a, 2.0), (b, 0.5)], seed=0, epoch=0, shuffle=True)
    per_dataset = Counter()
    for p in pieces:
        per_dataset[p.path[0]] += p.stop - p.start
    assert per_dataset == {"a": 12, "b": 5}


# ---------------------------------------------------------------------------- the loader


def test_batches_hold_clip_pixels_labels_and_captions(coco):
    batches = run_epoch(loader(coco, num_workers=0, batch_size=4, image_size=224))
    first = batches[0]
    assert first.pixels.shape == (4, 3, 224, 224) and first.pixels.dtype == torch.float32
    assert first.keys[0] == "000000000001"
    assert first.labels[0] == ["man", "horse", "beach", "sunset", "view", "number"]
    assert first.captions[0] == "A man riding a horse on a beach at sunset. Another view number 0."
    expected = preprocess(load_image(coco.parent / "raw" / "val2017" / "000000000001.jpg"), 224)
    assert torch.equal(first.pixels[0], expected)
    assert not first.padded.any()


@pytest.mark.parametrize("shuffle", [False, True])
def test_every_sample_exactly_once_across_2_ranks_x_2_workers(coco, shuffle):
    seen, streams = [], set()
    for rank in range(2):
        ld = loader(coco, rank=rank, world_size=2, shuffle=shuffle, shuffle_buffer=4, seed=7)
        batches = run_epoch(ld)
        assert len(batches) == len(ld)
        streams |= {b.stream for b in batches}
        rank_keys = keys_of(batches)
        assert len(rank_keys) == ld.num_samples
        seen += rank_keys
        assert not ld.skipped
    assert sorted(seen) == ALL_KEYS  # none repeated, none lost
    assert streams == {0, 1, 2, 3}  # 4 streams over 5 uneven shards, all busy


@pytest.mark.parametrize("balance", ["drop", "pad"])
def test_balanced_modes_give_every_rank_the_same_count(coco, balance):
    counts, real = [], []
    for rank in range(2):
        ld = loader(coco, rank=rank, world_size=2, balance=balance, shuffle=True, seed=1)
        batches = run_epoch(ld)
        assert len(batches) == len(ld)
        counts.append(len(keys_of(batches)))
        real += [k for b in batches for k, pad in zip(b.keys, b.padded.tolist()) if not pad]
    if balance == "drop":
        assert counts == [11, 11] and len(set(real)) == 22
    else:
        assert counts == [12, 12] and sorted(real) == ALL_KEYS  # one flagged repeat


def test_shuffle_is_deterministic_given_seed_and_epoch(coco):
    def order(epoch, seed=3):
        ld = loader(coco, shuffle=True, shuffle_buffer=8, seed=seed)
        ld.set_epoch(epoch)
        return keys_of(run_epoch(ld))

    assert order(0) == order(0)
    assert order(1) == order(1)
    assert order(0) != order(1) and order(0) != order(0, seed=4)
    assert sorted(order(1)) == ALL_KEYS
    plain = keys_of(run_epoch(loader(coco, num_workers=0)))
    assert plain == ALL_KEYS  # no shuffle: tar order


def test_resume_mid_epoch_skips_exactly_what_was_consumed(coco):
    def make():
        ld = loader(coco, shuffle=True, shuffle_buffer=6, seed=11, batch_size=2)
        ld.set_epoch(2)
        return ld

    full = run_epoch(make())
    first = make()
    taken = []
    for batch in first:
        taken.append(batch)
        if len(taken) == 5:
            break
    state = json.loads(json.dumps(first.state_dict()))  # survives a checkpoint file
    second = make()
    second.load_state_dict(state)
    rest = run_epoch(second)
    assert sorted(keys_of(taken) + keys_of(rest)) == ALL_KEYS

    def per_stream(batches):
        out = {}
        for b in batches:
            out.setdefault(b.stream, []).extend(b.keys)
        return out

    joined = per_stream(taken)
    for stream, keys in per_stream(rest).items():
        joined.setdefault(stream, []).extend(keys)
    assert joined == per_stream(full)  # each stream continues in the same order
    again = run_epoch(second)  # a new pass without load_state_dict is a whole epoch
    assert sorted(keys_of(again)) == ALL_KEYS


def test_resume_refuses_a_different_loader(coco):
    ld = loader(coco, shuffle=True)
    next(iter(ld))
    other = loader(coco, shuffle=True, batch_size=4)
    with pytest.raises(NxtrecError, match="batch_size: saved 3, now 4"):
        other.load_state_dict(ld.state_dict())


def test_corrupt_and_unlabelled_samples_are_skipped_and_counted(tmp_path):
    good = datagen.image_bytes(1)
    write_raw_shard(tmp_path / "d" / "000000.tar", [
        labelled("a", ["dog"], 1),
        labelled("b", ["cat"], 2, image=good[: len(good) // 2]),  # truncated JPEG
        {"__key__": "c", "txt": b"no image", "json": json.dumps({"labels": ["x"]}).encode()},
        {"__key__": "d", "jpg": good, "json": b"{broken"},
        {"__key__": "e", "jpg": good, "json": json.dumps({"caption": "no labels field"}).encode()},
        labelled("f", [], 3),  # a caption without nouns
        labelled("g", ["bird"], 4),
    ])  # fmt: skip
    shards = tmp_path / "d"
    kept = loader(shards, num_workers=0)
    assert keys_of(run_epoch(kept)) == ["a", "f", "g"]
    assert kept.skipped == {"corrupt image": 1, "no image": 1, "bad json": 1, "unlabelled": 1}
    dropped = loader(shards, num_workers=2, empty_labels="skip")
    assert keys_of(run_epoch(dropped)) == ["a", "g"]
    assert dropped.skipped == {"corrupt image": 1, "no image": 1, "bad json": 1, "unlabelled": 1, "no labels": 1}


def test_truncated_tar_does_not_stop_the_epoch(tmp_path, coco):
    folder = tmp_path / "t"
    folder.mkdir()
    for name in ("000000.tar", "000001.tar"):
        (folder / name).write_bytes((coco / name).read_bytes())
    data = (folder / "000000.tar").read_bytes()
    (folder / "000000.tar").write_bytes(data[: len(data) // 2])  # a download that died
    ld = loader(folder)
    keys = keys_of(run_epoch(ld))
    lengths = registry.shard_lengths(registry.expand_shards([str(folder)]))
    assert 0 < lengths[0].samples < 5 and lengths[1].samples == 5
    assert len(keys) == len(set(keys)) == sum(s.samples for s in lengths)
    assert set(ALL_KEYS[5:10]) <= set(keys)


def test_damaged_shard_loses_only_its_rest_and_counts_it(tmp_path, coco):
    folder = tmp_path / "dmg"
    folder.mkdir()
    for name in ("000000.tar", "000001.tar", "manifest.json"):
        (folder / name).write_bytes((coco / name).read_bytes())
    path = folder / "000001.tar"
    with tarfile.open(path) as tf:
        offset = tf.getmember("000000000008.jpg").offset  # the third sample's first header
    data = bytearray(path.read_bytes())
    data[offset : offset + 512] = b"\xff" * 512  # same size: the manifest still vouches for 5
    path.write_bytes(bytes(data))
    ld = loader(folder)
    keys = keys_of(run_epoch(ld))
    assert sorted(keys) == ALL_KEYS[:7]  # shard 0, and shard 1 up to the damage
    assert ld.skipped == {"unreadable shard": 3}


def test_unlabelled_shards_are_refused_with_the_fix(tmp_path):
    datagen.write_img2dataset_shard(tmp_path / "cc" / "00000.tar", 0, 3)
    with pytest.raises(NxtrecError, match="nxtrec labels add"):
        loader(tmp_path / "cc")
    add_labels(tmp_path / "cc", progress=False)
    assert len(keys_of(run_epoch(loader(tmp_path / "cc")))) == 3


# ---------------------------------------------------------------------------- lengths and registry


def test_lengths_are_counted_once_and_cached(tmp_path, monkeypatch):
    folder = tmp_path / "cc"
    datagen.write_img2dataset_shard(folder / "00000.tar", 0, 3)
    datagen.write_img2dataset_shard(folder / "00001.tar", 3, 2)
    paths = registry.expand_shards([str(folder)])
    assert [(s.samples, s.labelled) for s in registry.shard_lengths(paths)] == [(3, 0), (2, 0)]
    assert (folder / registry.COUNT_CACHE).is_file()

    def no_counting(path):
        raise AssertionError("counted again")

    monkeypatch.setattr(registry, "count_shard", no_counting)
    assert [s.samples for s in registry.shard_lengths(paths)] == [3, 2]
    monkeypatch.undo()
    datagen.write_img2dataset_shard(folder / "00001.tar", 3, 4)  # changed: counted again
    assert [s.samples for s in registry.shard_lengths(paths)] == [3, 4]


def test_lengths_come_from_the_manifest(coco, monkeypatch):
    monkeypatch.setattr(registry, "count_shard", lambda path: pytest.fail("counted a shard the manifest lists"))
    lengths = registry.shard_lengths(registry.expand_shards([str(coco)]))
    assert [(s.samples, s.labelled) for s in lengths] == [(5, 5), (5, 5), (5, 5), (5, 5), (3, 3)]


def test_registry_toml_and_yaml(tmp_path, coco):
    (tmp_path / "datasets.toml").write_text(
        f"""
root = "{coco.parent}"
[datasets.coco_val]
shards = "shards/{{000000..000002}}.tar"
split = "val2017"
[datasets.mix]
shards = ["shards/000003.tar", "shards/000004.tar"]
weight = 2
"""
    )
    reg = registry.Registry.load(tmp_path / "datasets.toml")
    assert reg.get("coco_val").split == "val2017" and reg.get("mix").weight == 2.0
    ld = data_loader.build_loader(["coco_val", "mix"], reg, batch_size=4, image_size=32, num_workers=0)
    keys = keys_of(run_epoch(ld))
    assert ld.num_samples == 15 + 2 * 8 == len(keys)
    assert Counter(Counter(keys).values()) == {1: 15, 2: 8}

    (tmp_path / "reg.yaml").write_text("datasets:\n  c:\n    shards: [coco/000000.tar]\n")
    (tmp_path / "coco").symlink_to(coco)
    assert registry.Registry.load(tmp_path / "reg.yaml").get("c").shards == [str(tmp_path / "coco" / "000000.tar")]


@pytest.mark.parametrize(
    "text,message",
    [
        ("[datasets.a]\nshard = 'x'\n", "unknown keys"),
        ("[datasets.a]\nshards = 'x'\nweight = 0\n", "positive number"),
        ("[datasets.a]\nweight = 1\n", "'shards' must be"),
        ("[datasets.a\n", "not valid TOML"),
        ("name = 1\n", "a registry needs"),
    ],
)
def test_registry_errors(tmp_path, text, message):
    (tmp_path / "r.toml").write_text(text)
    with pytest.raises(NxtrecError, match=message):
        registry.Registry.load(tmp_path / "r.toml")


def test_missing_shards_and_unknown_names(tmp_path):
    (tmp_path / "r.toml").write_text("[datasets.a]\nshards = 'nowhere/{0..2}.tar'\n")
    with pytest.raises(NxtrecError, match="no shards found"):
        data_loader.build_loader("a", tmp_path / "r.toml")
    with pytest.raises(NxtrecError, match="no dataset 'b'"):
        data_loader.build_loader("b", tmp_path / "r.toml")


# ---------------------------------------------------------------------------- commands


def test_data_stats_and_list(tmp_path, coco, capsys):
    reg = tmp_path / "datasets.toml"
    reg.write_text(f"[datasets.coco_val]\nshards = '{coco}'\nsplit = 'val2017'\n")
    png = tmp_path / "labels.png"
    assert main(["data", "stats", "coco_val", "--registry", str(reg), "--top", "5", "--png", str(png)]) == 0
    out = capsys.readouterr().out
    assert "samples   23" in out and "shards    5" in out
    assert "(1 with no labels, 0 without a labels field)" in out
    assert out.splitlines()[6].split()[1:3] == ["view", "22"]  # in every caption but the no-noun one
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert main(["data", "list", "--registry", str(reg)]) == 0
    assert capsys.readouterr().out.splitlines()[1].split() == ["coco_val", "val2017", "1", "5", "23"]


def test_data_stats_of_a_folder_without_registry(coco, capsys, monkeypatch, tmp_path):
    monkeypatch.chdir(tmp_path)
    assert main(["data", "stats", str(coco), "--top", "1"]) == 0
    assert "samples   23" in capsys.readouterr().out
    assert main(["data", "stats", "nothing"]) == 2
    assert "no registry" in capsys.readouterr().err
