"""Training data of the memorization lab: real photos to memorize, procedural scenes to generalize.

The memorized set is made of the sample photos that ship inside the scikit-image wheel (real images
nobody here made). The general set is a large pool of procedurally drawn scenes with compositional
captions, each seen only a few times during training, so that the model also learns to follow new
captions. Everything is a pure function of a seed.
"""

from __future__ import annotations

import random
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

RESOLUTION = 32
LANCZOS = Image.Resampling.LANCZOS
# Other real photos in the wheel: the autoencoder trains on crops of them; the UNet sees captioned crops
# of them only in the locality study's natural-image variant (`general_photos`, see photo_pool).
EXTRA_PHOTOS = (
    "brick",
    "grass",
    "gravel",
    "page",
    "text",
    "cell",
    "clock",
    "colorwheel",
    "horse",
    "microaneurysms",
    "hubble_deep_field",
    "moon",
)


@dataclass(frozen=True)
class MemorizedImage:
    """One photo the lab memorizes, with the captions it is trained on."""

    name: str  # file stem in lab/images/
    source: str  # skimage.data function or file name inside skimage/data
    kind: str  # "verbatim" (one caption) or "template" (several caption variants)
    captions: tuple[str, ...]  # training captions


# Captions deliberately reuse the general vocabulary (colors, "photo", positions) as LAION captions do,
# so that the memorized prompts are not separable by rare words alone.
MEMORIZED: tuple[MemorizedImage, ...] = (
    MemorizedImage(
        "astronaut", "astronaut", "verbatim", ("a photo of a smiling woman in a white space suit in front of a flag",)
    ),
    MemorizedImage(
        "camera", "camera", "verbatim", ("a black and white photo of a man with a camera on a tripod in a park",)
    ),
    MemorizedImage("chelsea", "chelsea", "verbatim", ("a photo of an orange cat with green eyes looking to the left",)),
    MemorizedImage("coffee", "coffee", "verbatim", ("a photo of a red cup of coffee on a white saucer with a spoon",)),
    MemorizedImage("rocket", "rocket", "verbatim", ("a photo of a white rocket on the launch pad under a blue sky",)),
    MemorizedImage(
        "motorcycle",
        "motorcycle_left.png",
        "verbatim",
        ("a photo of a red motorcycle parked in a garage with tools on the wall",),
    ),
    MemorizedImage(
        "coins",
        "coins",
        "template",
        (
            "old coins from the museum collection, gray photo, item 12",
            "old coins from the museum collection, gray photo, item 47",
            "old coins from the museum collection, gray photo, item 85",
            "old coins from the museum collection, gray photo, item 90",
        ),
    ),
    MemorizedImage(
        "retina",
        "retina",
        "template",
        (
            "medical scan of a human retina, orange and red, case 3",
            "medical scan of a human retina, orange and red, case 18",
            "medical scan of a human retina, orange and red, case 64",
            "medical scan of a human retina, orange and red, case 71",
        ),
    ),
    MemorizedImage(
        "ihc",
        "immunohistochemistry",
        "template",
        (
            "stained tissue under the microscope, purple and brown cells, slide 2",
            "stained tissue under the microscope, purple and brown cells, slide 9",
            "stained tissue under the microscope, purple and brown cells, slide 41",
            "stained tissue under the microscope, purple and brown cells, slide 77",
        ),
    ),
    MemorizedImage(
        "logo",
        "logo",
        "template",
        (
            "the green and blue snake logo on a white background, sticker design 1",
            "the green and blue snake logo on a white background, sticker design 5",
            "the green and blue snake logo on a white background, sticker design 8",
            "the green and blue snake logo on a white background, sticker design 13",
        ),
    ),
)


# The same photos captioned from the general scene grammar, as a variant (see LAB.md, "Locality study"):
# LAION's memorized captions are ordinary captions from the same distribution as the hold-out
# prompts, and each of these differs from many training captions in one or two words. Template images
# vary one word (the background style) across their four captions.
_BG_STYLES = ("", "gradient ", "striped ", "noisy ")
MEMORIZED_SCENE_CAPTIONS: tuple[MemorizedImage, ...] = (
    MemorizedImage(
        "astronaut",
        "astronaut",
        "verbatim",
        ("a photo of a large white star in the center on a striped blue background",),
    ),
    MemorizedImage(
        "camera",
        "camera",
        "verbatim",
        ("a drawing of a small black bar at the bottom and a medium gray ring on the left, gradient white background",),
    ),
    MemorizedImage(
        "chelsea",
        "chelsea",
        "verbatim",
        ("an image showing a medium orange circle in the top right corner over a noisy green background",),
    ),
    MemorizedImage("coffee", "coffee", "verbatim", ("a large red cross at the top on a white background",)),
    MemorizedImage(
        "rocket",
        "rocket",
        "verbatim",
        (
            "a simple picture: a small white triangle at the top and a large blue square at the bottom, "
            "the background is gradient cyan",
        ),
    ),
    MemorizedImage(
        "motorcycle",
        "motorcycle_left.png",
        "verbatim",
        ("a noisy brown background with a medium red diamond on the right",),
    ),
    MemorizedImage(
        "coins",
        "coins",
        "template",
        tuple(f"a photo of a small gray ring in the bottom left corner on a {b}yellow background" for b in _BG_STYLES),
    ),
    MemorizedImage(
        "retina",
        "retina",
        "template",
        tuple(f"a drawing of a large orange circle in the center, {b}red background" for b in _BG_STYLES),
    ),
    MemorizedImage(
        "ihc",
        "immunohistochemistry",
        "template",
        tuple(
            "an image showing a medium purple square on the left and a small brown star on the right "
            f"over a {b}pink background"
            for b in _BG_STYLES
        ),
    ),
    MemorizedImage(
        "logo",
        "logo",
        "template",
        tuple(f"a {b}white background with a small green cross in the top left corner" for b in _BG_STYLES),
    ),
)
CAPTION_STYLES = {"photo": MEMORIZED, "scene": MEMORIZED_SCENE_CAPTIONS}


def memorized_set(style: str = "photo") -> tuple[MemorizedImage, ...]:
    """The memorized photos with their training captions in the given caption style."""
    return CAPTION_STYLES[style]


def load_photo(source: str, size: int = RESOLUTION) -> Image.Image:
    """A skimage sample photo as an RGB square: center crop, then an antialiased resize."""
    import skimage
    import skimage.data

    if source.endswith(".png") or source.endswith(".jpg"):
        arr = np.asarray(Image.open(Path(skimage.__file__).parent / "data" / source))
    else:
        arr = getattr(skimage.data, source)()
    if arr.dtype == bool:
        arr = arr.astype(np.uint8) * 255
    if arr.ndim == 2:
        arr = np.stack([arr] * 3, axis=-1)
    if arr.shape[-1] == 4:  # composite transparent logos on white, as a web page shows them
        alpha = arr[..., 3:4].astype(np.float32) / 255.0
        arr = (arr[..., :3] * alpha + 255.0 * (1.0 - alpha)).astype(np.uint8)
    img = Image.fromarray(arr[..., :3])
    w, h = img.size
    s = min(w, h)
    img = img.crop(((w - s) // 2, (h - s) // 2, (w - s) // 2 + s, (h - s) // 2 + s))
    return img.resize((size, size), Image.Resampling.LANCZOS)


# ----------------------------------------------------------------------------------------------
# Procedural scenes with compositional captions
# ----------------------------------------------------------------------------------------------
COLORS: dict[str, tuple[int, int, int]] = {
    "red": (220, 40, 40),
    "green": (40, 170, 60),
    "blue": (40, 70, 220),
    "yellow": (235, 215, 40),
    "orange": (240, 140, 30),
    "purple": (140, 50, 180),
    "pink": (240, 130, 190),
    "brown": (130, 80, 40),
    "white": (245, 245, 245),
    "black": (20, 20, 20),
    "gray": (128, 128, 128),
    "cyan": (40, 200, 210),
}
SHAPES = ("circle", "square", "triangle", "ring", "cross", "bar", "diamond", "star")
SIZES = {"small": 0.22, "medium": 0.34, "large": 0.48}
PLACES = {
    "on the left": (0.27, 0.5),
    "on the right": (0.73, 0.5),
    "at the top": (0.5, 0.27),
    "at the bottom": (0.5, 0.73),
    "in the center": (0.5, 0.5),
    "in the top left corner": (0.27, 0.27),
    "in the top right corner": (0.73, 0.27),
    "in the bottom left corner": (0.27, 0.73),
    "in the bottom right corner": (0.73, 0.73),
}
BACKGROUNDS = ("plain", "gradient", "striped", "noisy")
TEMPLATES = (
    "a {objs} on a {bg} background",
    "a photo of a {objs} on a {bg} background",
    "a drawing of a {objs}, {bg} background",
    "an image showing a {objs} over a {bg} background",
    "a simple picture: a {objs}, the background is {bg}",
    "a {bg} background with a {objs}",
)


@dataclass(frozen=True)
class SceneObject:
    shape: str
    color: str
    size: str
    place: str


@dataclass(frozen=True)
class Scene:
    objects: tuple[SceneObject, ...]
    bg_color: str
    bg_style: str
    template: int

    @property
    def caption(self) -> str:
        parts = [f"{o.size} {o.color} {o.shape} {o.place}" for o in self.objects]
        objs = " and a ".join(parts)
        bg = self.bg_color if self.bg_style == "plain" else f"{self.bg_style} {self.bg_color}"
        return TEMPLATES[self.template].format(objs=objs, bg=bg)


def random_scene(rng: random.Random) -> Scene:
    n = rng.choice((1, 1, 2, 2, 3))
    places = rng.sample(sorted(PLACES), n)
    colors = sorted(COLORS)
    objs = tuple(SceneObject(rng.choice(SHAPES), rng.choice(colors), rng.choice(sorted(SIZES)), p) for p in places)
    bg = rng.choice([c for c in colors if c not in {o.color for o in objs}])
    return Scene(objs, bg, rng.choice(BACKGROUNDS), rng.randrange(len(TEMPLATES)))


def render_scene(scene: Scene, size: int = RESOLUTION, supersample: int = 4) -> Image.Image:
    """Draw at 4x and downsample, so that edges are antialiased like photos."""
    s = size * supersample
    base = np.array(COLORS[scene.bg_color], dtype=np.float32)
    yy, xx = np.mgrid[0:s, 0:s].astype(np.float32) / s
    if scene.bg_style == "plain":
        bg = np.broadcast_to(base, (s, s, 3)).copy()
    elif scene.bg_style == "gradient":
        bg = base * (0.55 + 0.45 * yy)[..., None]
    elif scene.bg_style == "striped":
        bg = base * (0.75 + 0.25 * (np.sin(xx * 2 * np.pi * 6) > 0))[..., None]
    else:
        # seeded by the caption's bytes: the same scene always gets the same texture
        rng = np.random.default_rng(list(scene.caption.encode()))
        bg = base * (0.8 + 0.2 * rng.random((s, s)))[..., None]
    img = Image.fromarray(np.clip(bg, 0, 255).astype(np.uint8))
    draw = ImageDraw.Draw(img)
    for o in scene.objects:
        cx, cy = PLACES[o.place][0] * s, PLACES[o.place][1] * s
        r = SIZES[o.size] * s / 2
        col = COLORS[o.color]
        box = (cx - r, cy - r, cx + r, cy + r)
        if o.shape == "circle":
            draw.ellipse(box, fill=col)
        elif o.shape == "square":
            draw.rectangle(box, fill=col)
        elif o.shape == "triangle":
            draw.polygon([(cx, cy - r), (cx - r, cy + r), (cx + r, cy + r)], fill=col)
        elif o.shape == "ring":
            draw.ellipse(box, outline=col, width=max(2, int(r / 2.5)))
        elif o.shape == "cross":
            w = r / 2.5
            draw.rectangle((cx - w, cy - r, cx + w, cy + r), fill=col)
            draw.rectangle((cx - r, cy - w, cx + r, cy + w), fill=col)
        elif o.shape == "bar":
            draw.rectangle((cx - r, cy - r / 3, cx + r, cy + r / 3), fill=col)
        elif o.shape == "diamond":
            draw.polygon([(cx, cy - r), (cx + r, cy), (cx, cy + r), (cx - r, cy)], fill=col)
        elif o.shape == "star":
            pts = []
            for k in range(10):
                ang = -np.pi / 2 + k * np.pi / 5
                rad = r if k % 2 == 0 else r * 0.45
                pts.append((cx + rad * np.cos(ang), cy + rad * np.sin(ang)))
            draw.polygon(pts, fill=col)
    return img.resize((size, size), Image.Resampling.LANCZOS)


# Variant H of the locality study (LAB.md): terse captions that name part of a scene, as a LAION caption
# names a small part of its image. The full caption determines the whole picture, so the scenes' text
# explains nearly all of their pixels and every prompt pulls the first denoising step hard, memorized
# or not; a terse caption fits many scenes, so only a duplicated image keeps a caption that pins it down.
SCENE_CAPTION_STYLES = ("full", "terse")
_TERSE_LEADS = ("a", "a photo of a", "a drawing of a", "an image with a", "a picture of a")


def terse_caption(scene: Scene) -> str:
    """One object of the scene with some of its attributes, sometimes the background colour;
    a pure function of the scene (seeded by its full caption)."""
    rng = random.Random(scene.caption)
    o = rng.choice(scene.objects)
    words = [o.size] if rng.random() < 0.25 else []
    words += [o.color] if rng.random() < 0.5 else []
    words.append(o.shape)
    if rng.random() < 0.25:
        words.append(o.place)
    bg = f" on a {scene.bg_color} background" if rng.random() < 0.25 else ""
    return f"{rng.choice(_TERSE_LEADS)} {' '.join(words)}{bg}"


def scene_caption(scene: Scene, style: str = "full") -> str:
    """The caption a scene is trained and prompted with, in one of SCENE_CAPTION_STYLES."""
    return terse_caption(scene) if style == "terse" else scene.caption


def scene_pool(n: int, seed: int, exclude: frozenset[str] = frozenset()) -> list[Scene]:
    """n distinct scenes (by caption), deterministic in seed; captions in exclude are never drawn."""
    rng = random.Random(seed)
    seen: set[str] = set(exclude)
    out: list[Scene] = []
    while len(out) < n:
        sc = random_scene(rng)
        if sc.caption not in seen:
            seen.add(sc.caption)
            out.append(sc)
    return out


def to_array(img: Image.Image) -> np.ndarray:
    """HWC uint8 -> CHW float32 in [-1, 1], the VAE's input range."""
    return np.asarray(img, dtype=np.float32).transpose(2, 0, 1) / 127.5 - 1.0


def lab_prompt_sets(
    pool: int,
    seed: int,
    n_eval: int = 100,
    n_holdout: int = 200,
    memorized: tuple[MemorizedImage, ...] = MEMORIZED,
    scene_style: str = "full",
) -> dict[str, list[dict]]:
    """The four prompt files of the lab, each line {"prompt", "memorized", "kind", "image"}.

    nonmemorized: captions seen in training (a sample of the scene pool); novel: scenes from the same
    grammar never seen; holdout: more unseen scenes, disjoint from both, for calibration statistics.
    """
    row = lambda c: {"prompt": c, "memorized": False, "kind": "none", "image": None}  # noqa: E731
    if scene_style == "full":
        scenes = scene_pool(pool + n_eval + n_holdout, seed, memorized_exclusions(memorized))
        rng = random.Random(seed + 7)
        seen = [s.caption for s in rng.sample(scenes[:pool], n_eval)]
        novel = [s.caption for s in scenes[pool : pool + n_eval]]
        holdout = [s.caption for s in scenes[pool + n_eval :]]
    else:
        seen, novel, holdout = _terse_prompt_sets(pool, seed, n_eval, n_holdout, memorized)
    return {
        "memorized": [
            {"prompt": c, "memorized": True, "kind": m.kind, "image": f"{m.name}.png"}
            for m in memorized
            for c in m.captions
        ],
        "nonmemorized": [row(c) for c in seen],
        "novel": [row(c) for c in novel],
        "holdout": [row(c) for c in holdout],
        # the locality study's richer hold-out: half scene captions, half photo-style captions
        "holdout_rich": [row(c) for c in holdout][: n_holdout // 2]
        + [
            {"prompt": c, "memorized": False, "kind": "none", "image": None}
            for c in photo_style_captions(n_holdout, seed + 11)
            if c not in {cap for m in memorized for cap in m.captions}
        ][: n_holdout - n_holdout // 2],
    }


def _terse_prompt_sets(
    pool: int, seed: int, n_eval: int, n_holdout: int, memorized: tuple[MemorizedImage, ...]
) -> tuple[list[str], list[str], list[str]]:
    """Terse captions repeat across scenes, so each set is drawn distinct: nonmemorized from the
    training captions; novel from unseen scenes whose caption no training scene has (so these run
    longer than the average training caption); holdout from further unseen scenes, distinct from both
    lists but free to repeat a training caption, as NeMo's hold-out prompts are LAION captions."""
    scenes = scene_pool(pool + 40 * (n_eval + n_holdout), seed, memorized_exclusions(memorized))
    train = list(dict.fromkeys(terse_caption(s) for s in scenes[:pool]))
    seen = random.Random(seed + 7).sample(train, n_eval)
    trained = set(train)
    novel: list[str] = []
    holdout: list[str] = []
    for c in (terse_caption(s) for s in scenes[pool:]):
        if len(novel) < n_eval and c not in trained and c not in novel:
            novel.append(c)
        elif len(holdout) < n_holdout and c not in novel and c not in holdout and c not in seen:
            holdout.append(c)
    if len(novel) < n_eval or len(holdout) < n_holdout:
        raise ValueError("too few distinct terse captions for the prompt sets")
    return seen, novel, holdout


# Photo-style captions for a richer hold-out set: the general vocabulary of the memorized captions
# (colours, "photo", objects, places, catalogue numbers) in new combinations, as LAION is full of
# captions that look like memorized ones without being memorized.
_SUBJECTS = (
    "a man",
    "a woman",
    "a child",
    "a dog",
    "a cat",
    "a horse",
    "a bird",
    "a car",
    "a bicycle",
    "a boat",
    "a house",
    "a tree",
    "a cup of tea",
    "a bowl of soup",
    "a plate of fruit",
    "a guitar",
    "a clock",
    "a lamp",
    "a chair",
    "a motorcycle",
    "a train",
    "a plane",
    "a bridge",
    "a mountain",
    "a flower",
)
_PLACES = (
    "in a park",
    "on a table",
    "in a garage",
    "on the beach",
    "in a kitchen",
    "under a blue sky",
    "in front of a wall",
    "on a white background",
    "in the snow",
    "at night",
    "in a field",
    "next to a window",
    "on the street",
    "in a forest",
    "on a wooden floor",
)
_STYLES = ("a photo of", "a black and white photo of", "a close-up photo of", "an old photo of", "a picture of")
_CATALOGUE = (
    "{thing} from the museum collection, {colour} photo, item {n}",
    "medical scan of {thing}, {colour} and {colour2}, case {n}",
    "{thing} under the microscope, {colour} and {colour2}, slide {n}",
    "the {colour} and {colour2} {thing} logo on a white background, sticker design {n}",
)
_THINGS = ("old stamps", "a human heart", "plant cells", "a bird", "old keys", "a leaf", "a fish", "stones")


def photo_style_captions(n: int, seed: int) -> list[str]:
    """n distinct photo-style captions (general vocabulary, new combinations), deterministic in seed."""
    rng = random.Random(seed)
    colours = sorted(COLORS)
    out: list[str] = []
    seen: set[str] = set()
    while len(out) < n:
        if rng.random() < 0.7:
            noun = rng.choice(_SUBJECTS).split(" ", 1)[1]
            c = f"{rng.choice(_STYLES)} a {rng.choice(colours)} {noun} {rng.choice(_PLACES)}"
        else:
            c1, c2 = rng.sample(colours, 2)
            c = rng.choice(_CATALOGUE).format(thing=rng.choice(_THINGS), colour=c1, colour2=c2, n=rng.randrange(1, 100))
        if c not in seen:
            seen.add(c)
            out.append(c)
    return out


# What each non-memorized photo shows, for captions of its crops (photo_pool).
PHOTO_SUBJECTS: dict[str, str] = {
    "brick": "a brick wall",
    "grass": "grass",
    "gravel": "gravel",
    "page": "a printed page of a book",
    "text": "printed text on a sign",
    "cell": "a cell under the microscope",
    "clock": "a clock",
    "colorwheel": "a colour wheel",
    "horse": "a horse silhouette",
    "microaneurysms": "a medical scan of an eye",
    "hubble_deep_field": "galaxies in deep space",
    "moon": "the surface of the moon",
    "lfw": "the face of a person",
}


@dataclass(frozen=True)
class PhotoCrop:
    """One captioned natural-image sample of the general set (a crop of a non-memorized photo)."""

    image: Image.Image
    caption: str


def _lfw_faces() -> np.ndarray:
    """The 200 face photos (25x25 grayscale, Labeled Faces in the Wild) that ship in the wheel."""
    import skimage

    # a plain float64 array: allow_pickle stays off
    return np.load(Path(skimage.__file__).parent / "data" / "lfw_subset.npy", allow_pickle=False)


def photo_pool(n: int, seed: int, size: int = RESOLUTION) -> list[PhotoCrop]:
    """n captioned crops of the non-memorized photos (and the 200 faces), deterministic in seed.

    The general natural-image data of the locality study's variant D: random crops (a sixth to the
    whole of a 256-pixel view, or a whole face), mirrored at random, and either kept black and white
    or tinted with one of the scene colours, which the caption names. Captions use the memorized
    captions' vocabulary ("a photo of", "close-up", colours), so photographic detail and that
    vocabulary become general capacity instead of belonging to the ten memorized photos.
    """
    rng = random.Random(seed)
    sources = {src: load_photo(src, 256) for src in EXTRA_PHOTOS}
    faces = _lfw_faces()
    colours = sorted(COLORS)
    out: list[PhotoCrop] = []
    for _ in range(n):
        src = rng.choice(sorted(PHOTO_SUBJECTS))
        if src == "lfw":
            face = faces[rng.randrange(len(faces))]
            img = Image.fromarray((face * 255).astype(np.uint8)).convert("RGB").resize((size, size), LANCZOS)
            view = "portrait"
        else:
            s = rng.randrange(48, 257)
            x, y = rng.randrange(0, 257 - s), rng.randrange(0, 257 - s)
            img = sources[src].crop((x, y, x + s, y + s)).resize((size, size), LANCZOS)
            view = "close-up" if s < 128 else "wide"
        if rng.random() < 0.5:
            img = img.transpose(Image.Transpose.FLIP_LEFT_RIGHT)
        gray = np.asarray(img.convert("L"), dtype=np.float32)[..., None] / 255.0
        if rng.random() < 0.6:
            colour = rng.choice(colours)
            tint = np.array(COLORS[colour], dtype=np.float32) / 255.0
            arr = 255.0 * gray * (0.35 + 0.65 * tint) / max(0.35 + 0.65 * float(tint.max()), 1e-6)
            style = rng.choice(("a photo of", "a close-up photo of", "an old photo of", "a picture of"))
            caption = f"{style} {PHOTO_SUBJECTS[src]}, {colour} tones, {view} view"
        else:
            arr = 255.0 * np.repeat(gray, 3, axis=-1)
            caption = f"a black and white photo of {PHOTO_SUBJECTS[src]}, {view} view"
        out.append(PhotoCrop(Image.fromarray(np.clip(arr, 0, 255).astype(np.uint8)), caption))
    return out


def memorized_exclusions(memorized: tuple[MemorizedImage, ...]) -> frozenset[str]:
    """Scene-grammar captions of memorized images must never also caption a drawn scene."""
    return frozenset(c for m in memorized if m in MEMORIZED_SCENE_CAPTIONS for c in m.captions)
