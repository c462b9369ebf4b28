"""Synthetic scenes with real English object names (`nxtrec synth`): colour emoji glyphs of
everyday objects on varied backgrounds, with a natural caption and the true object list.

The glyphs come from Noto Color Emoji (Debian: `apt-get install fonts-noto-color-emoji`),
rendered with PIL at the font's bitmap size and scaled, rotated and placed at random.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw, ImageFilter, ImageFont

from nxtrec.errors import NxtrecError

EMOJI_FONT_PATHS = (
    "/usr/share/fonts/truetype/noto/NotoColorEmoji.ttf",
    "/usr/share/fonts/noto/NotoColorEmoji.ttf",
    "/usr/local/share/fonts/NotoColorEmoji.ttf",
)
EMOJI_BITMAP_SIZE = 109  # the only size Noto Color Emoji's bitmaps come in
TOKENIZER_PIECES = 1000  # with byte fallback: every caption word becomes one or two pieces


@dataclass(frozen=True)
class Category:
    name: str
    glyph: str
    plural: str
    colour: str = ""  # the glyph's dominant colour, used in some captions
    synonyms: tuple[str, ...] = ()


def _c(name, glyph, plural=None, colour="", synonyms=()):
    return Category(name, glyph, plural or name + "s", colour, tuple(synonyms))


CATEGORIES: tuple[Category, ...] = (
    _c("dog", "\U0001F415", colour="brown", synonyms=("puppy",)),
    _c("cat", "\U0001F408", colour="orange", synonyms=("kitten",)),
    _c("horse", "\U0001F40E", colour="brown"),
    _c("cow", "\U0001F404"),
    _c("pig", "\U0001F416", colour="pink"),
    _c("sheep", "\U0001F411", plural="sheep", colour="white"),
    _c("goat", "\U0001F410"),
    _c("rabbit", "\U0001F407", synonyms=("bunny",)),
    _c("mouse", "\U0001F401", plural="mice", colour="grey"),
    _c("elephant", "\U0001F418", colour="grey"),
    _c("giraffe", "\U0001F992", colour="yellow"),
    _c("zebra", "\U0001F993"),
    _c("camel", "\U0001F42A"),
    _c("monkey", "\U0001F412", colour="brown"),
    _c("bear", "\U0001F43B", colour="brown"),
    _c("penguin", "\U0001F427"),
    _c("chicken", "\U0001F414", colour="white", synonyms=("hen",)),
    _c("duck", "\U0001F986"),
    _c("owl", "\U0001F989", colour="brown"),
    _c("bird", "\U0001F426", colour="blue"),
    _c("fish", "\U0001F41F", plural="fish", colour="blue"),
    _c("dolphin", "\U0001F42C", colour="blue"),
    _c("whale", "\U0001F40B", colour="blue"),
    _c("turtle", "\U0001F422", colour="green", synonyms=("tortoise",)),
    _c("snake", "\U0001F40D", colour="green"),
    _c("frog", "\U0001F438", colour="green"),
    _c("butterfly", "\U0001F98B", plural="butterflies", colour="blue"),
    _c("snail", "\U0001F40C"),
    _c("bee", "\U0001F41D", colour="yellow"),
    _c("ladybug", "\U0001F41E", colour="red"),
    _c("apple", "\U0001F34E", colour="red"),
    _c("pear", "\U0001F350", colour="green"),
    _c("banana", "\U0001F34C", colour="yellow"),
    _c("orange", "\U0001F34A", colour="orange"),
    _c("lemon", "\U0001F34B", colour="yellow"),
    _c("grape", "\U0001F347", colour="purple"),
    _c("strawberry", "\U0001F353", plural="strawberries", colour="red"),
    _c("cherry", "\U0001F352", plural="cherries", colour="red"),
    _c("watermelon", "\U0001F349", colour="green"),
    _c("pineapple", "\U0001F34D", colour="yellow"),
    _c("peach", "\U0001F351", plural="peaches", colour="orange"),
    _c("carrot", "\U0001F955", colour="orange"),
    _c("tomato", "\U0001F345", plural="tomatoes", colour="red"),
    _c("potato", "\U0001F954", plural="potatoes", colour="brown"),
    _c("mushroom", "\U0001F344", colour="red"),
    _c("bread", "\U0001F35E", plural="breads", colour="brown", synonyms=("loaf",)),
    _c("cheese", "\U0001F9C0", plural="cheeses", colour="yellow"),
    _c("pizza", "\U0001F355"),
    _c("burger", "\U0001F354", synonyms=("hamburger",)),
    _c("cake", "\U0001F370"),
    _c("cookie", "\U0001F36A", colour="brown", synonyms=("biscuit",)),
    _c("donut", "\U0001F369", colour="pink", synonyms=("doughnut",)),
    _c("egg", "\U0001F95A", colour="white"),
    _c("cup", "\U0001F375", colour="white"),
    _c("mug", "\u2615", colour="white"),
    _c("bottle", "\U0001F37E", colour="green"),
    _c("glass", "\U0001F377", plural="glasses", colour="red"),
    _c("car", "\U0001F697", colour="red", synonyms=("automobile",)),
    _c("taxi", "\U0001F695", colour="yellow", synonyms=("cab",)),
    _c("bus", "\U0001F68C", plural="buses"),
    _c("truck", "\U0001F69A", colour="red", synonyms=("lorry",)),
    _c("tractor", "\U0001F69C", colour="green"),
    _c("bicycle", "\U0001F6B2", synonyms=("bike",)),
    _c("motorcycle", "\U0001F3CD", synonyms=("motorbike",)),
    _c("train", "\U0001F686"),
    _c("airplane", "\u2708", colour="grey", synonyms=("plane", "aircraft")),
    _c("helicopter", "\U0001F681"),
    _c("rocket", "\U0001F680"),
    _c("boat", "\u26F5", synonyms=("sailboat",)),
    _c("ship", "\U0001F6A2"),
    _c("tree", "\U0001F333", colour="green"),
    _c("palm", "\U0001F334", colour="green"),
    _c("cactus", "\U0001F335", plural="cacti", colour="green"),
    _c("flower", "\U0001F33C", colour="yellow", synonyms=("blossom",)),
    _c("rose", "\U0001F339", colour="red"),
    _c("tulip", "\U0001F337", colour="pink"),
    _c("sunflower", "\U0001F33B", colour="yellow"),
    _c("leaf", "\U0001F341", plural="leaves", colour="red"),
    _c("mountain", "\u26F0"),
    _c("volcano", "\U0001F30B", plural="volcanoes"),
    _c("house", "\U0001F3E0", synonyms=("home",)),
    _c("castle", "\U0001F3F0"),
    _c("tent", "\u26FA"),
    _c("umbrella", "\u2602", colour="purple"),
    _c("sun", "\u2600", colour="yellow"),
    _c("moon", "\U0001F319", colour="yellow"),
    _c("star", "\u2B50", colour="yellow"),
    _c("cloud", "\u2601", colour="white"),
    _c("snowman", "\u26C4", plural="snowmen", colour="white"),
    _c("fire", "\U0001F525", plural="fires", colour="orange", synonyms=("flame",)),
    _c("ball", "\u26BD", synonyms=("football",)),
    _c("basketball", "\U0001F3C0", colour="orange"),
    _c("guitar", "\U0001F3B8"),
    _c("drum", "\U0001F941"),
    _c("trumpet", "\U0001F3BA", colour="yellow"),
    _c("book", "\U0001F4D5", colour="red"),
    _c("pencil", "\u270F", colour="yellow"),
    _c("scissors", "\u2702", plural="scissors"),
    _c("key", "\U0001F511", colour="yellow"),
    _c("lock", "\U0001F512", colour="yellow", synonyms=("padlock",)),
    _c("bell", "\U0001F514", colour="yellow"),
    _c("clock", "\u23F0", colour="red", synonyms=("alarm",)),
    _c("watch", "\u231A", plural="watches"),
    _c("phone", "\U0001F4F1", synonyms=("smartphone",)),
    _c("computer", "\U0001F4BB", synonyms=("laptop",)),
    _c("camera", "\U0001F4F7"),
    _c("television", "\U0001F4FA", synonyms=("tv",)),
    _c("lamp", "\U0001F4A1", colour="yellow", synonyms=("bulb",)),
    _c("candle", "\U0001F56F"),
    _c("chair", "\U0001FA91", colour="brown"),
    _c("bed", "\U0001F6CF"),
    _c("door", "\U0001F6AA", colour="brown"),
    _c("hat", "\U0001F3A9", colour="black"),
    _c("shoe", "\U0001F45F"),
    _c("shirt", "\U0001F455", colour="blue", synonyms=("tshirt",)),
    _c("dress", "\U0001F457", plural="dresses"),
    _c("glove", "\U0001F9E4", colour="green"),
    _c("sock", "\U0001F9E6"),
    _c("bag", "\U0001F45C", synonyms=("handbag",)),
    _c("backpack", "\U0001F392", colour="red"),
    _c("crown", "\U0001F451", colour="yellow"),
    _c("ring", "\U0001F48D"),
    _c("balloon", "\U0001F388", colour="red"),
    _c("gift", "\U0001F381", synonyms=("present",)),
    _c("hammer", "\U0001F528"),
    _c("axe", "\U0001FA93"),
    _c("anchor", "\u2693"),
)


def write_tag_list(path: str | Path) -> Path:
    """The categories as a tag list for `--vocab` / `--map-to`: one line per category, its name
    first, then its synonyms (`dog | puppy`)."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    lines = [" | ".join((c.name, *c.synonyms)) for c in CATEGORIES]
    path.write_text(f"# the {len(CATEGORIES)} synthetic-scene categories (nxtrec synth --tag-list)\n" + "\n".join(lines) + "\n")
    return path


NUMBERS = ("a", "two", "three", "four", "five", "six")
BACKGROUND_COLOURS = (
    (245, 245, 240), (25, 25, 30), (128, 128, 128), (200, 50, 45), (60, 150, 70), (60, 110, 200),
    (235, 210, 70), (240, 150, 50), (130, 70, 160), (240, 160, 190), (130, 90, 60), (225, 210, 180),
)


@lru_cache(maxsize=1)
def emoji_font() -> ImageFont.FreeTypeFont:
    for path in EMOJI_FONT_PATHS:
        if Path(path).is_file():
            return ImageFont.truetype(path, EMOJI_BITMAP_SIZE)
    raise NxtrecError(
        "the Noto Color Emoji font is missing: install it with `apt-get install fonts-noto-color-emoji` "
        f"(Debian/Ubuntu) or put NotoColorEmoji.ttf at {EMOJI_FONT_PATHS[-1]}"
    )


@lru_cache(maxsize=None)
def glyph_image(glyph: str) -> Image.Image:
    """The glyph as a tightly cropped RGBA image."""
    canvas = Image.new("RGBA", (EMOJI_BITMAP_SIZE * 2, EMOJI_BITMAP_SIZE * 2), (0, 0, 0, 0))
    ImageDraw.Draw(canvas).text((8, 8), glyph, font=emoji_font(), embedded_color=True)
    box = canvas.getbbox()
    if box is None:
        raise NxtrecError(f"the emoji font has no glyph for {glyph!r}")
    return canvas.crop(box)


def background(rng: random.Random, size: int) -> Image.Image:
    """A random background: plain, gradient, noise, stripes or checks."""
    rgb = rng.choice(BACKGROUND_COLOURS)
    kind = rng.choice(["plain", "gradient", "noise", "stripes", "checks"])
    img = Image.new("RGB", (size, size), rgb)
    draw = ImageDraw.Draw(img)
    other = tuple(min(255, max(0, c + rng.randint(-70, 70))) for c in rgb)
    if kind == "gradient":
        vertical = rng.random() < 0.5
        for i in range(size):
            t = i / (size - 1)
            col = tuple(int(a * (1 - t) + b * t) for a, b in zip(rgb, other))
            draw.line([(0, i), (size, i)] if vertical else [(i, 0), (i, size)], fill=col)
    elif kind == "noise":
        noise = np.random.default_rng(rng.randrange(2**32)).normal(0, rng.uniform(10, 60), (size, size, 1))
        img = Image.fromarray(np.clip(np.asarray(img, dtype=np.float32) + noise, 0, 255).astype(np.uint8))
    elif kind == "stripes":
        width = rng.randint(6, 30)
        for x in range(-size, size * 2, width * 2):
            draw.polygon([(x, 0), (x + width, 0), (x + width + size // 3, size), (x + size // 3, size)], fill=other)
    elif kind == "checks":
        cell = rng.randint(10, 40)
        for y in range(0, size, cell):
            for x in range(0, size, cell):
                if (x // cell + y // cell) % 2:
                    draw.rectangle([x, y, x + cell - 1, y + cell - 1], fill=other)
    if rng.random() < 0.3:
        img = img.filter(ImageFilter.GaussianBlur(rng.uniform(0.5, 2.0)))
    return img


@dataclass
class SceneObject:
    name: str
    box: tuple[int, int, int, int]  # x0, y0, x1, y1 in pixels; may reach past the image edge

    def to_dict(self, size: int) -> dict:
        """The object's name and its box clipped to the `size` x `size` image."""
        x0, y0, x1, y1 = self.box
        return {"object": self.name, "box": [max(0, x0), max(0, y0), min(size, x1), min(size, y1)]}


def render_scene(rng: random.Random, size: int = 256,
                 include: Category | None = None) -> tuple[Image.Image, str, list[SceneObject]]:
    """One scene: the image, a caption written from its content, and the objects drawn.
    `include`: a category drawn in place of the first one picked (nxtrec.data.synth_new)."""
    img = background(rng, size)
    n_kinds = rng.choice([1, 1, 2, 2, 2, 3, 3, 4])
    kinds = rng.sample(CATEGORIES, n_kinds)
    if include is not None:
        kinds[0] = include
    counts = []
    budget = 6
    for i, _ in enumerate(kinds):
        c = 1 if rng.random() < 0.7 else rng.randint(2, 3)
        c = max(1, min(c, budget - (len(kinds) - i - 1)))
        counts.append(c)
        budget -= c
    objects: list[SceneObject] = []
    for cat, count in zip(kinds, counts):
        for _ in range(count):
            side = int(size * rng.uniform(0.18, 0.5))
            glyph = glyph_image(cat.glyph)
            scale = side / max(glyph.size)
            g = glyph.resize((max(1, int(glyph.width * scale)), max(1, int(glyph.height * scale))), Image.LANCZOS)
            if rng.random() < 0.5:
                g = g.rotate(rng.uniform(-35, 35), resample=Image.BICUBIC, expand=True)
            if rng.random() < 0.3:
                g = g.transpose(Image.FLIP_LEFT_RIGHT)
            x = rng.randint(-g.width // 5, size - g.width * 4 // 5)
            y = rng.randint(-g.height // 5, size - g.height * 4 // 5)
            img.paste(g, (x, y), g)
            objects.append(SceneObject(cat.name, (x, y, x + g.width, y + g.height)))
    caption = write_caption(rng, list(zip(kinds, counts)), objects)
    return img, caption, objects


def _phrase(rng: random.Random, cat: Category, count: int, with_colour: bool) -> str:
    name = rng.choice(cat.synonyms) if cat.synonyms and rng.random() < 0.2 else cat.name
    colour = f"{cat.colour} " if with_colour and cat.colour and rng.random() < 0.5 else ""
    if count == 1:
        article = "an" if (colour or name)[0] in "aeiou" else "a"
        return f"{article} {colour}{name}"
    plural = cat.plural if name == cat.name else name + "s"
    return f"{NUMBERS[count - 1]} {colour}{plural}"


def _relation(a: SceneObject, b: SceneObject) -> str:
    ax, ay = (a.box[0] + a.box[2]) / 2, (a.box[1] + a.box[3]) / 2
    bx, by = (b.box[0] + b.box[2]) / 2, (b.box[1] + b.box[3]) / 2
    dx, dy = bx - ax, by - ay
    if math.hypot(dx, dy) < 40:
        return "next to"
    if abs(dy) > abs(dx):
        return "above" if dy > 0 else "below"
    return "beside"


def _join(parts: list[str]) -> str:
    return parts[0] if len(parts) == 1 else ", ".join(parts[:-1]) + " and " + parts[-1]


def write_caption(rng, kinds_counts, objects) -> str:
    phrases = [_phrase(rng, cat, count, True) for cat, count in kinds_counts]
    # No "on a blue background": the label rules drop "background" as a noise word and
    # would leave its colour behind as a false noun label.
    if len(phrases) >= 2 and rng.random() < 0.5:
        first = next(o for o in objects if o.name == kinds_counts[0][0].name)
        second = next(o for o in objects if o.name == kinds_counts[1][0].name)
        text = f"{phrases[0]} {_relation(first, second)} {_join(phrases[1:])}"
    else:
        forms = ["{}", "there {} {}", "{} here"] + (["{} together"] if len(objects) > 1 else [])
        form = rng.choice(forms)
        if form.startswith("there"):
            text = form.format("are" if kinds_counts[0][1] > 1 else "is", _join(phrases))
        else:
            text = form.format(_join(phrases))
    return text[0].upper() + text[1:] + "."


def generate(out: str | Path, n: int, seed: int = 0, n_val: int | None = None, size: int = 256,
             shard_size: int = 1000, workers: int = 1, backend: str = "spacy", progress: bool = True) -> dict:
    """Render `n` training scenes and `n_val` held-out scenes (default 5%, at least 1) and pack
    them into `out/train` and `out/val` shards through the normal packer, so ground-truth
    labels are extracted from the captions by the normal label backend. The true objects are
    kept in each sample's metadata (`objects`). Also writes `out/tokenizer.model`, a
    SentencePiece model trained on the training captions. Returns the two pack summaries.
    Each object's box is kept too (`boxes`: `{"object", "box": [x0, y0, x1, y1]}` in pixels, in
    drawing order, later objects on top), for the pointing game of benchmarks/bench_grounding.py."""
    from tqdm import tqdm

    from nxtrec.data.pack import PackOptions, pack
    from nxtrec.data.sources import Record
    from nxtrec.model.config import TEMPLATES
    from nxtrec.model.tokenizer import train_tokenizer

    out = Path(out)
    n_val = max(1, n // 20) if n_val is None else n_val
    # Independent streams: the validation scenes do not change when `n` changes.
    splits = {"train": (n, random.Random(seed)), "val": (n_val, random.Random(f"val-{seed}"))}
    summaries = {}
    for split, (count, rng) in splits.items():
        if count == 0:  # e.g. only the held-out split, to evaluate a model
            continue
        folder = out / "images" / split
        folder.mkdir(parents=True, exist_ok=True)
        records = []
        for i in tqdm(range(count), desc=f"render {split}", unit="scene", disable=None if progress else True):
            key = f"{split}{i:07d}"
            path = folder / f"{key}.jpg"
            img, caption, objects = render_scene(rng, size)
            if not path.exists():  # re-runs reuse what was rendered (same seed, same scenes)
                tmp = path.with_suffix(".tmp.jpg")
                img.save(tmp, quality=92)
                tmp.replace(path)
            records.append(Record(key, str(path), caption, f"images/{split}/{key}.jpg",
                                  extra={"objects": sorted({o.name for o in objects}),
                                         "boxes": [o.to_dict(size) for o in objects]}))
        if split == "train":
            # The demo model's vocabulary: the captions (hence every label) and the prompts.
            texts = [r.caption for r in records] + list(TEMPLATES)
            train_tokenizer(texts, out / "tokenizer.model", vocab_size=TOKENIZER_PIECES, pieces=[","])
        options = PackOptions(shard_size=shard_size, backend=backend)
        summaries[split] = pack(records, out / split, kind="synth", split=split, options=options,
                                workers=workers, progress=progress)
    return summaries
