"""Small real datasets made on the fly for the data tests: generated JPEG/PNG images, a
COCO captions JSON, a Localized Narratives JSONL, a JSONL and a caption folder."""

from __future__ import annotations

import io
import json
from pathlib import Path

import numpy as np
from PIL import Image

CAPTIONS = [
    "A man riding a horse on a beach at sunset.",
    "Two dogs playing with a ball in the grass.",
    "A red car parked next to a tree.",
    "A cat sleeping on a wooden table.",
    "A woman holding an umbrella in the rain.",
    "A plate of food with a fork and a knife.",
    "A boat on a lake near the mountains.",
    "A child eating an apple in a kitchen.",
]
NO_NOUN_CAPTION = "Very beautiful and quite amazing!"


def image_bytes(seed: int, size=(48, 36), fmt="JPEG") -> bytes:
    rng = np.random.default_rng(seed)
    # smooth gradients plus noise: compresses like a photo, differs per seed
    y, x = np.mgrid[0 : size[1], 0 : size[0]]
    base = np.stack([(x * 5 + seed * 17) % 256, (y * 7 + seed * 29) % 256, ((x + y) * 3 + seed * 43) % 256], -1)
    arr = np.clip(base + rng.integers(0, 24, base.shape), 0, 255).astype(np.uint8)
    buf = io.BytesIO()
    Image.fromarray(arr).save(buf, fmt)
    return buf.getvalue()


def write_image(path: Path, seed: int, size=(48, 36), fmt="JPEG") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(image_bytes(seed, size, fmt))
    return path


def corrupt_jpeg(path: Path, seed: int = 999) -> Path:
    """A JPEG cut in the middle of its data: the header parses, decoding fails."""
    data = image_bytes(seed, (64, 64))
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(data[: len(data) // 2])
    return path


def caption_of(i: int) -> str:
    return CAPTIONS[i % len(CAPTIONS)]


def make_coco(root: Path, n: int, corrupt: tuple = (), no_noun: tuple = (), missing: tuple = ()) -> tuple[Path, Path]:
    """`root/val2017/*.jpg` and `root/annotations/captions_val2017.json`; each image has
    two captions (joined by the packer). Returns (images folder, captions file)."""
    images = root / "val2017"
    anns, imgs = [], []
    for i in range(n):
        name = f"{i + 1:012d}.jpg"
        imgs.append({"id": i + 1, "file_name": name})
        if i in corrupt:
            corrupt_jpeg(images / name)
        elif i not in missing:
            write_image(images / name, i)
        if i in no_noun:
            texts = [NO_NOUN_CAPTION]
        else:
            texts = [caption_of(i), f"  Another view number {i}.  "]
        anns += [{"id": 100 * i + j, "image_id": i + 1, "caption": t} for j, t in enumerate(texts)]
    captions = root / "annotations" / "captions_val2017.json"
    captions.parent.mkdir(parents=True, exist_ok=True)
    captions.write_text(json.dumps({"images": imgs, "annotations": anns}))
    return images, captions


def make_narratives(root: Path, n: int) -> tuple[Path, Path]:
    """OpenImages-like `root/validation/IMAGE_ID.jpg` and a narratives JSONL; the first
    image has two narratives."""
    images = root / "validation"
    lines = []
    for i in range(n):
        image_id = f"{i * 7919 + 4096:016x}"
        write_image(images / f"{image_id}.jpg", 50 + i)
        lines.append({"dataset_id": "open_images", "image_id": image_id, "annotator_id": 1, "caption": caption_of(i)})
    lines.append(dict(lines[0], annotator_id=2, caption="In this picture we can see a bird."))
    narratives = root / "open_images_validation_localized_narratives.jsonl"
    narratives.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return images, narratives


def make_jsonl(root: Path, n: int, fifo_at: int | None = None) -> Path:
    """`root/list.jsonl` with relative image paths; `fifo_at` makes that image a named pipe
    (reading it blocks), to catch a pack run in the middle."""
    import os

    lines = []
    for i in range(n):
        rel = f"img/{i:04d}.jpg"
        if i == fifo_at:
            (root / "img").mkdir(parents=True, exist_ok=True)
            os.mkfifo(root / rel)
        else:
            write_image(root / rel, 200 + i)
        lines.append({"image": rel, "caption": caption_of(i)})
    path = root / "list.jsonl"
    path.write_text("".join(json.dumps(line) + "\n" for line in lines))
    return path


def make_folder(root: Path, n: int) -> Path:
    """Images with same-name .txt captions, in two sub-folders; one PNG; one image without
    a caption file."""
    for i in range(n):
        sub = root / ("a" if i % 2 else "b")
        fmt, ext = ("PNG", "png") if i == 0 else ("JPEG", "jpg")
        write_image(sub / f"photo.{i}.{ext}", 300 + i, fmt=fmt)
        (sub / f"photo.{i}.txt").write_text(caption_of(i) + "\n")
    write_image(root / "b" / "uncaptioned.jpg", 399)
    return root


def write_img2dataset_shard(path: Path, start: int, n: int, bad_json_at: int | None = None) -> list[str]:
    """A shard as img2dataset writes it: KEY.jpg, KEY.txt, KEY.json (url, caption, key,
    status...), no labels. Returns the keys."""
    import webdataset as wds

    path.parent.mkdir(parents=True, exist_ok=True)
    keys = []
    with wds.TarWriter(str(path), encoder=False) as w:
        for i in range(start, start + n):
            key = f"{i:09d}"
            meta = {"url": f"http://example.com/{i}.jpg", "caption": caption_of(i), "key": key, "status": "success",
                    "width": 48, "height": 36}  # fmt: skip
            w.write({
                "__key__": key,
                "jpg": image_bytes(i),
                "txt": caption_of(i).encode(),
                "json": b"{not json" if i == bad_json_at else json.dumps(meta).encode(),
            })  # fmt: skip
            keys.append(key)
    return keys


def read_shard(path: Path) -> list[dict]:
    """All samples of a tar, as webdataset reads them."""
    from webdataset.tariterators import group_by_keys, tar_file_expander

    with open(path, "rb") as stream:
        return list(group_by_keys(tar_file_expander([{"url": str(path), "stream": stream}])))
