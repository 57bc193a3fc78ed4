"""The built-in long-tailed dataset: synthetic scenes in LVIS v1 format (the CPU benchmark).

Each class is a (colour, texture, shape) combination, so every colour, texture and shape is
shared by several classes: a rare class differs from some frequent classes by one attribute
only, which is what lets a softmax classifier trained on a long tail suppress it. Training
images follow a steep long tail (LVIS groups r / c / f all populated); the validation set is
balanced. Objects occlude each other; annotations are the visible parts (polygons, boxes,
areas) as in LVIS. Pure numpy + OpenCV; no detectron2 import.

Layout under `out_dir` (see datasets/README.md):
    annotations/lvis_v1_train.json, annotations/lvis_v1_val.json
    train/000000000001.jpg ...  val/<id>.jpg ...   (ids unique across the two splits)
    params.json                 generator parameters + version, written last
and, built on first use by generate_holdout, a held-out split (balanced like val, for choosing
hyper-parameters such as a calibration's gamma without the test split) beside it in
`<out_dir>_holdout`: annotations/lvis_v1_holdout.json, holdout/<id>.jpg, params.json.
"""
import fcntl
import glob
import json
import math
import os
import shutil

import cv2
import numpy as np

GENERATOR_VERSION = 1
DEFAULTS = dict(num_classes=60, train_images=2000, val_images=250, image_size=160, seed=0)
# The main job's set (tools/run_main.sh, datasets/README.md "The demo set"): the same kind of
# scenes, half the classes, a short epoch (800 training images), a longer rare group whose
# classes all have 8-10 training images (learnable in a few hundred iterations once not
# suppressed; with 5-10 the rare gap against CE was under 5 seed std: docs/BENCHMARKS.md),
# 96 px images (the demo model's input size: no resize), 300 validation images (~45
# instances per class: less evaluation noise on APr).
DEMO = dict(num_classes=30, train_images=800, val_images=300, image_size=96, seed=0,
            rare_share=0.3, rare_images=(10, 8))
# the random streams of each split: scene plans ([seed, 2, key]) and rendering ([seed, 3 + key,
# image]); the held-out split has streams of its own, so train and val are as without it
SPLIT_KEYS = {"train": 0, "val": 1, "holdout": 2}

COLOURS = {  # RGB
    "red": (215, 45, 40),
    "orange": (240, 135, 30),
    "yellow": (225, 205, 40),
    "green": (55, 165, 65),
    "blue": (45, 85, 215),
    "purple": (135, 60, 185),
}
TEXTURES = ("solid", "striped", "dotted")
SHAPES = ("circle", "square", "triangle", "star", "cross", "hexagon", "crescent", "arrow")

RARE_MAX, COMMON_MAX = 10, 100  # LVIS: r = 1-10 training images, c = 11-100, f = more
RARE_SHARE, COMMON_SHARE = 0.2, 0.38  # of the classes; the rest are frequent (default)
RARE_TARGETS = (10, 1)  # training images per class, first and last rank of the group (default)
COMMON_TARGETS = (95, 12)  # margins from the group boundaries
FREQUENT_MIN_TARGET = 130  # smallest head target; the largest one fills the budget (below)
DISTINCT_CLASSES_PER_TRAIN_IMAGE = 3.8  # mean; sets the training budget of class-image pairs
OBJECTS_PER_IMAGE = (3, 6)  # inclusive

SCALE_RANGE = (0.1, 0.45)  # object diameter / image side, log-uniform
MIN_DIAMETER_PX = 16
ASPECT_RANGE = (0.75, 1.33)  # width / height before rotation
PLACE_TRIES = 40
PLACE_VISIBLE_FRAC = 0.5  # an object placed later may hide at most half of an earlier one
MIN_VISIBLE_FRAC, MIN_VISIBLE_PX = 0.3, 40  # an annotation is dropped below either
MIN_FRAGMENT_PX = 10  # smaller visible pieces of an object are not annotated
POLYGON_EPSILON_PX = 0.5  # cv2.approxPolyDP tolerance
NOT_EXHAUSTIVE_PROB = 0.05  # per image: one present class marked not exhaustively annotated
TRAIN_NEG_PROB = 0.25  # per absent class in a training image: listed in neg_category_ids
JPEG_QUALITY = 92


# ---------------------------------------------------------------- classes and the long tail


def class_attributes(num_classes):
    """(colour, texture, shape) names of classes 1..C, as a list indexed by class id - 1.

    Independent of the seed. Greedy balanced choice over a fixed shuffle of all
    6 x 3 x 8 = 144 combinations: each pick uses the least-used attribute values so far.
    """
    combos = [(c, t, s) for c in COLOURS for t in TEXTURES for s in SHAPES]
    if not 1 <= num_classes <= len(combos):
        raise ValueError(f"num_classes must be in 1..{len(combos)}, got {num_classes}")
    remaining = [combos[i] for i in np.random.default_rng(2024).permutation(len(combos))]
    used = {}
    chosen = []
    for _ in range(num_classes):
        best = min(remaining, key=lambda a: sum(used.get(v, 0) for v in a))
        remaining.remove(best)
        chosen.append(best)
        for v in best:
            used[v] = used.get(v, 0) + 1
    return chosen


def group_sizes(num_classes, rare_share=RARE_SHARE):
    """Designed (rare, common, frequent) numbers of classes."""
    n_rare = round(rare_share * num_classes)
    n_common = round(COMMON_SHARE * num_classes)
    return n_rare, n_common, num_classes - n_rare - n_common


def class_ranks(num_classes, seed, rare_share=RARE_SHARE):
    """Rank of each class in the long tail (0 = most frequent), shape (C,), by class id - 1.

    A seeded permutation, redrawn until every attribute value of a rare class also occurs
    in a frequent class (so tail classes are spread over shapes / colours / textures and
    always share attributes with the head).
    """
    n_rare, _, n_freq = group_sizes(num_classes, rare_share)
    attrs = class_attributes(num_classes)
    rng = np.random.default_rng([seed, 1])
    for _ in range(1000):
        order = rng.permutation(num_classes)  # order[rank] = class index
        head = {v for k in order[:n_freq] for v in attrs[k]}
        tail = {v for k in order[num_classes - n_rare :] for v in attrs[k]}
        if tail <= head:
            break
    ranks = np.empty(num_classes, dtype=np.int64)
    ranks[order] = np.arange(num_classes)
    return ranks


def _head_targets(n, budget, cap):
    """Targets of the n frequent classes: log-spaced from a top value down to
    FREQUENT_MIN_TARGET, the top chosen (bisection) so that they sum to `budget`; capped at
    `cap` images. When the budget is too small for that, all n get an equal share."""
    if n == 0:
        return np.zeros(0)
    if budget <= n * FREQUENT_MIN_TARGET:
        return np.full(n, max(budget / n, 1.0))
    lo, hi = float(FREQUENT_MIN_TARGET), float(max(cap, FREQUENT_MIN_TARGET))
    for _ in range(60):
        mid = (lo + hi) / 2
        if np.geomspace(mid, FREQUENT_MIN_TARGET, n).sum() < budget:
            lo = mid
        else:
            hi = mid
    return np.geomspace(hi, FREQUENT_MIN_TARGET, n)


def train_image_targets(num_classes, train_images, seed, rare_share=RARE_SHARE,
                        rare_images=RARE_TARGETS):
    """Designed number of training images containing each class, int array (C,), by id - 1.

    Pure (no rendering). By rank: frequent classes from a few hundred down to
    FREQUENT_MIN_TARGET (they take what the budget of DISTINCT_CLASSES_PER_TRAIN_IMAGE
    class-image pairs per image leaves), common 95 -> 12, rare `rare_images` (10 -> 1),
    log-spaced in each group; `rare_share` of the classes are rare. Non-increasing with
    rank; every target is at most `train_images`. With too few
    images for a head above COMMON_MAX, the head shares the budget equally (no "f" group).
    """
    max_rare = 1 - COMMON_SHARE  # the common classes keep their share; frequent ones remain
    if not (RARE_MAX >= rare_images[0] >= rare_images[1] >= 1 and 0 <= rare_share < max_rare):
        raise ValueError(f"need {RARE_MAX} >= rare_images[0] >= rare_images[1] >= 1 and rare_share "
                         f"in [0, {max_rare:g}), got {rare_images}, {rare_share}")
    n_rare, n_common, n_freq = group_sizes(num_classes, rare_share)
    common, rare = np.geomspace(*COMMON_TARGETS, n_common), np.geomspace(*rare_images, n_rare)
    tail = np.concatenate([common, rare])
    budget = DISTINCT_CLASSES_PER_TRAIN_IMAGE * train_images - tail.sum()
    if budget < n_freq:
        raise ValueError(
            f"train_images={train_images} is too few for num_classes={num_classes}: the common "
            f"and rare classes alone need {tail.sum() / DISTINCT_CLASSES_PER_TRAIN_IMAGE:.0f}+"
        )
    by_rank = np.concatenate([_head_targets(n_freq, budget, train_images), tail])
    by_rank = np.minimum(np.round(np.sort(by_rank)[::-1]).astype(np.int64), train_images)
    return by_rank[class_ranks(num_classes, seed, rare_share)]


def frequency_group(image_count):
    """LVIS frequency group of a class from its number of training images: "r", "c" or "f"."""
    return "r" if image_count <= RARE_MAX else "c" if image_count <= COMMON_MAX else "f"


# ---------------------------------------------------------------- which classes go where


def _adjust(values, total, lo, hi, rng):
    """Add or remove 1 at random entries of an int array, within [lo, hi], until it sums to
    `total` (or no entry can move)."""
    values = values.copy()
    while (diff := total - values.sum()) != 0:
        movable = np.flatnonzero(values < hi if diff > 0 else values > lo)
        if movable.size == 0:
            break
        picked = rng.choice(movable, size=min(abs(diff), movable.size), replace=False)
        values[picked] += np.sign(diff)
    return values


def _allocate(targets, capacities, rng):
    """Assign classes to images: class k to targets[k] distinct images, image i receiving
    capacities[i] distinct classes. Ryser's construction (each class takes the images with the
    most remaining capacity, random among ties) succeeds whenever any assignment exists.
    Returns a list (one per image) of sorted class-index arrays."""
    remaining = capacities.astype(np.float64)
    members = [[] for _ in capacities]
    for k in rng.permutation(len(targets)):
        key = remaining + 0.5 * rng.random(len(remaining))
        chosen = np.argsort(-key, kind="stable")[: targets[k]]
        for i in chosen[remaining[chosen] > 0]:
            members[i].append(k)
            remaining[i] -= 1
    return [np.array(sorted(m), dtype=np.int64) for m in members]


def _scene_plans(split, num_classes, n_images, seed, tail=None):
    """Per image, the class index of every object to draw (duplicates allowed), in draw order
    before placement: list of int arrays. Train: long tail (`tail`: train_image_targets'
    rare_share / rare_images); val and holdout: balanced."""
    rng = np.random.default_rng([seed, 2, SPLIT_KEYS[split]])
    n_objects = rng.integers(OBJECTS_PER_IMAGE[0], OBJECTS_PER_IMAGE[1] + 1, n_images)
    if split == "train":
        targets = train_image_targets(num_classes, n_images, seed, **(tail or {}))
        distinct = _adjust(n_objects, targets.sum(), 1, OBJECTS_PER_IMAGE[1], rng)
        n_objects = np.maximum(n_objects, distinct)
    else:
        distinct = np.minimum(n_objects, num_classes)
        targets = np.full(num_classes, distinct.sum() // num_classes)
        targets[rng.permutation(num_classes)[: distinct.sum() % num_classes]] += 1
    plans = []
    for classes, n in zip(_allocate(targets, distinct, rng), n_objects):
        if classes.size == 0:  # only if the allocation was infeasible
            classes = rng.choice(num_classes, 1)
        extra = rng.choice(classes, n - classes.size)  # more instances of present classes
        plans.append(np.concatenate([rng.permutation(classes), extra]))
    return plans


# ---------------------------------------------------------------- rendering one scene


def _ngon(n, phase=-math.pi / 2):
    a = phase + 2 * math.pi * np.arange(n) / n
    return np.stack([np.cos(a), np.sin(a)], 1)


def _unit_shapes():
    """Shape name -> list of (polygon (N, 2) of circumradius <= 1, fill value); later
    polygons paint over earlier ones (value 0 cuts out)."""
    w = 0.34
    cross = [(-w, -1), (w, -1), (w, -w), (1, -w), (1, w), (w, w),
             (w, 1), (-w, 1), (-w, w), (-1, w), (-1, -w), (-w, -w)]
    arrow = [(-1, -0.3), (0.15, -0.3), (0.15, -0.75), (1, 0), (0.15, 0.75), (0.15, 0.3), (-1, 0.3)]
    circle = _ngon(32)
    return {
        "circle": [(circle, 1)],
        "square": [(_ngon(4, math.pi / 4), 1)],
        "triangle": [(_ngon(3), 1)],
        "star": [(_ngon(10) * np.where(np.arange(10) % 2, 0.45, 1.0)[:, None], 1)],
        "cross": [(np.array(cross, dtype=np.float64), 1)],
        "hexagon": [(_ngon(6), 1)],
        "crescent": [(circle, 1), (0.8 * circle + (0.45, 0.0), 0)],
        "arrow": [(np.array(arrow, dtype=np.float64), 1)],
    }


UNIT_SHAPES = _unit_shapes()


def _object_mask(shape, size, rng, max_scale):
    """Rasterize one randomly scaled, stretched, rotated and placed shape.

    Returns (mask bool (size, size), centre (x, y) px, radius px); coordinates have pixel
    centres at integers, as cv2 draws them.
    """
    lo = max(SCALE_RANGE[0], MIN_DIAMETER_PX / size)
    scale = math.exp(rng.uniform(math.log(lo), math.log(max(lo, max_scale))))
    radius = scale * size / 2
    aspect = math.sqrt(rng.uniform(*ASPECT_RANGE))
    theta = rng.uniform(-math.pi, math.pi)
    rot = np.array([[math.cos(theta), -math.sin(theta)], [math.sin(theta), math.cos(theta)]])
    ops = [(poly * (radius * aspect, radius / aspect)) @ rot.T for poly, _ in UNIT_SHAPES[shape]]
    lo_xy, hi_xy = ops[0].min(0), ops[0].max(0)
    centre = rng.uniform(0.5 - lo_xy, size - 1.5 - hi_xy)
    mask = np.zeros((size, size), np.uint8)
    for pts, (_, value) in zip(ops, UNIT_SHAPES[shape]):
        cv2.fillPoly(mask, [np.round((pts + centre) * 16).astype(np.int32)], value, cv2.LINE_8, 4)
    return mask.astype(bool), centre, radius


def _pixel_corners(mask):
    """Grid of pixel corners (H+1, W+1) uint8: 1 where a corner touches a pixel of `mask`.
    Its contours run along the pixel edges of `mask`, in pixel-edge coordinates."""
    p = np.pad(mask, 1)
    return (p[:-1, :-1] | p[1:, :-1] | p[:-1, 1:] | p[1:, 1:]).astype(np.uint8)


def _has_hole(mask):
    """Whether the outline of `mask` (traced on its pixel corners, where gaps of one pixel
    close) encloses background."""
    _, hierarchy = cv2.findContours(_pixel_corners(mask), cv2.RETR_CCOMP, cv2.CHAIN_APPROX_SIMPLE)
    return hierarchy is not None and bool((hierarchy[0][:, 3] >= 0).any())


def _fits(mask, placed):
    """Whether a new top object `mask` leaves every placed object visible enough and cuts
    no hole into one (a polygon outline cannot describe a hole)."""
    if mask.sum() < MIN_VISIBLE_PX / PLACE_VISIBLE_FRAC:
        return False
    for p in placed:
        if not (mask & p["visible"]).any():
            continue
        left = p["visible"] & ~mask
        enough = max(PLACE_VISIBLE_FRAC * p["area"], MIN_VISIBLE_PX)
        if np.count_nonzero(left) < enough or _has_hole(left):
            return False
    return True


def _place(plan, attrs, size, rng):
    """Lay out the planned objects, bottom to top. An object that finds no place in
    PLACE_TRIES tries (shrinking) is left out. Returns a list of dicts: cls, full and visible
    masks (bool (size, size)), full area px, centre (x, y) px, radius px."""
    placed = []
    for cls in plan:
        for attempt in range(PLACE_TRIES):
            max_scale = SCALE_RANGE[1] * 0.96**attempt
            mask, centre, radius = _object_mask(attrs[cls][2], size, rng, max_scale)
            if _fits(mask, placed):
                for p in placed:
                    p["visible"] &= ~mask
                placed.append(dict(cls=int(cls), full=mask, visible=mask.copy(),
                                   area=int(mask.sum()), centre=centre, radius=radius))
                break
    return placed


def _outline(piece):
    """Outline of one 8-connected mask piece along pixel edges: (N, 2) int (x, y) in
    pixel-edge coordinates (pixel (r, c) spans [c, c+1] x [r, r+1]), simplified. Traced on
    the pixel corners, so the polygon encloses the piece's pixels, not just their centres."""
    corners = _pixel_corners(piece)
    contours, _ = cv2.findContours(corners, cv2.RETR_EXTERNAL, cv2.CHAIN_APPROX_SIMPLE)
    return cv2.approxPolyDP(max(contours, key=len), POLYGON_EPSILON_PX, True).reshape(-1, 2)


def _polygons(visible):
    """Visible mask (bool (H, W)) -> (polygons as flat [x0, y0, x1, y1, ...] float lists in
    pixel-edge coordinates, the mask restricted to the pieces they describe). Pieces under
    MIN_FRAGMENT_PX pixels and degenerate outlines are dropped."""
    n, labels, stats, _ = cv2.connectedComponentsWithStats(visible.astype(np.uint8), connectivity=8)
    kept = np.zeros_like(visible)
    polygons = []
    for k in range(1, n):
        if stats[k, cv2.CC_STAT_AREA] < MIN_FRAGMENT_PX:
            continue
        piece = labels == k
        outline = _outline(piece)
        if len(outline) < 3 or cv2.contourArea(outline) < MIN_FRAGMENT_PX / 2:
            continue
        polygons.append([float(v) for v in outline.ravel()])
        kept |= piece
    return polygons, kept


def _annotate(placed, size):
    """Visible parts of the placed objects. Objects whose visible part is too small are
    removed (and not drawn), which can only uncover others; repeated until stable.
    Returns (kept objects, their annotations: category_id, segmentation, bbox, area)."""
    while True:
        covered = np.zeros((size, size), bool)
        anns = [None] * len(placed)
        for i in reversed(range(len(placed))):
            polygons, visible = _polygons(placed[i]["full"] & ~covered)
            covered |= placed[i]["full"]
            area = int(visible.sum())
            if polygons and area >= max(MIN_VISIBLE_FRAC * placed[i]["area"], MIN_VISIBLE_PX):
                ys, xs = np.nonzero(visible)
                x0, y0 = xs.min(), ys.min()
                bbox = [float(x0), float(y0), float(xs.max() + 1 - x0), float(ys.max() + 1 - y0)]
                anns[i] = dict(category_id=placed[i]["cls"] + 1, segmentation=polygons,
                               bbox=bbox, area=float(area))
        if None not in anns:
            return placed, anns
        placed = [p for p, a in zip(placed, anns) if a]


def _background(size, rng):
    """Muted, low-frequency noisy background with unlabelled blobs and lines in the object
    colours (half transparent). float32 (size, size, 3) RGB."""
    tint = rng.uniform(70, 190) + rng.normal(0, 12, 3)
    low = rng.normal(0, 22, (4, 4, 3)).astype(np.float32)
    low = cv2.resize(low, (size, size), interpolation=cv2.INTER_CUBIC)
    img = tint + low + rng.normal(0, 5, (size, size, 3))
    palette = np.array(list(COLOURS.values()), np.float32)
    for _ in range(rng.integers(1, 4)):  # irregular blobs
        n = rng.integers(7, 12)
        a = np.sort(rng.uniform(0, 2 * math.pi, n))
        r = rng.uniform(0.06, 0.2) * size * rng.uniform(0.5, 1.0, n)
        pts = np.stack([np.cos(a) * r, np.sin(a) * r], 1) + rng.uniform(0, size, 2)
        m = np.zeros((size, size), np.uint8)
        cv2.fillPoly(m, [np.round(pts).astype(np.int32)], 1)
        alpha = rng.uniform(0.3, 0.6)
        img[m > 0] = alpha * palette[rng.integers(len(palette))] + (1 - alpha) * img[m > 0]
    for _ in range(rng.integers(1, 4)):  # lines
        m = np.zeros((size, size), np.uint8)
        p0, p1 = rng.integers(0, size, (2, 2))
        cv2.line(m, tuple(map(int, p0)), tuple(map(int, p1)), 1, int(rng.integers(1, 3)))
        img[m > 0] = 0.6 * palette[rng.integers(len(palette))] + 0.4 * img[m > 0]
    return img


def _paint(img, obj, attrs, grid, rng):
    """Fill the object's full mask with its jittered colour, shading and texture (in place)."""
    colour, texture, _ = attrs[obj["cls"]]
    base = np.clip(np.array(COLOURS[colour], np.float32) + rng.normal(0, 14, 3), 0, 255)
    theta = rng.uniform(0, math.pi)
    dx, dy = grid[0] - obj["centre"][0], grid[1] - obj["centre"][1]
    u = (dx * math.cos(theta) + dy * math.sin(theta))[obj["full"]]
    v = (-dx * math.sin(theta) + dy * math.cos(theta))[obj["full"]]
    shade = 1 + rng.uniform(-0.15, 0.15) * u / obj["radius"]
    if texture == "striped":
        period = max(4.0, obj["radius"] * rng.uniform(0.35, 0.5))
        dark = (u / period) % 1 < 0.5
    elif texture == "dotted":
        period = max(5.0, obj["radius"] * rng.uniform(0.45, 0.6))
        dark = ((u / period) % 1 - 0.5) ** 2 + ((v / period) % 1 - 0.5) ** 2 < 0.32**2
    else:
        dark = np.zeros_like(u, dtype=bool)
    img[obj["full"]] = base * (shade * np.where(dark, 0.35, 1.0))[:, None]


def render_scene(plan, attrs, size, rng):
    """Draw one image. plan: class indices to draw (bottom to top); attrs: class_attributes.

    Returns (image uint8 (size, size, 3) RGB, annotations without ids: dicts with
    category_id, segmentation, bbox [x, y, w, h] px, area px)."""
    placed, anns = _annotate(_place(plan, attrs, size, rng), size)
    img = _background(size, rng)
    grid = np.mgrid[0:size, 0:size][::-1].astype(np.float32)  # (x, y)
    for obj in placed:
        _paint(img, obj, attrs, grid, rng)
    img = cv2.GaussianBlur(img.astype(np.float32), (3, 3), rng.uniform(0.3, 0.8))
    img += rng.normal(0, 3, img.shape)
    return np.clip(np.round(img), 0, 255).astype(np.uint8), anns


# ---------------------------------------------------------------- writing the dataset


def _write_split(root, split, plans, first_id, params, rng_key):
    """Render and save one split's images; returns (images, annotations) json lists."""
    num_classes, size = params["num_classes"], params["image_size"]
    attrs = class_attributes(num_classes)
    os.makedirs(os.path.join(root, split))
    images, annotations = [], []
    for i, plan in enumerate(plans):
        rng = np.random.default_rng([params["seed"], rng_key, i])
        img, anns = render_scene(plan, attrs, size, rng)
        image_id = first_id + i
        file_name = f"{image_id:012d}.jpg"
        path = os.path.join(root, split, file_name)
        cv2.imwrite(path, img[:, :, ::-1], [cv2.IMWRITE_JPEG_QUALITY, JPEG_QUALITY])
        present = sorted({a["category_id"] for a in anns})
        absent = np.setdiff1d(np.arange(1, num_classes + 1), present)
        if split == "train":
            absent = absent[rng.random(absent.size) < TRAIN_NEG_PROB]
        not_exhaustive = [int(rng.choice(present))] if rng.random() < NOT_EXHAUSTIVE_PROB else []
        images.append(
            dict(
                id=image_id,
                width=size,
                height=size,
                coco_url=f"http://synthetic/{split}/{file_name}",
                license=1,
                neg_category_ids=[int(c) for c in absent],
                not_exhaustive_category_ids=not_exhaustive,
            )
        )
        for a in anns:
            annotations.append(dict(a, id=len(annotations) + 1, image_id=image_id))
    return images, annotations


def _categories(num_classes, train_annotations):
    """LVIS category records with image / instance counts and frequency from the TRAIN set."""
    image_sets = [set() for _ in range(num_classes)]
    instances = np.zeros(num_classes, np.int64)
    for a in train_annotations:
        image_sets[a["category_id"] - 1].add(a["image_id"])
        instances[a["category_id"] - 1] += 1
    cats = []
    for k, (colour, texture, shape) in enumerate(class_attributes(num_classes)):
        name = f"{colour}_{texture}_{shape}"
        cats.append(
            dict(
                id=k + 1,
                name=name,
                synset=f"{name}.n.01",
                synonyms=[name],
                # "def" is LVIS's key for the definition
                **{"def": f"a {texture} {colour} {shape}"},
                frequency=frequency_group(len(image_sets[k])),
                image_count=len(image_sets[k]),
                instance_count=int(instances[k]),
            )
        )
    return cats


def _dump(obj, path):
    with open(path, "w") as f:
        json.dump(obj, f, sort_keys=True, separators=(",", ":"))


def _build(root, params):
    """Write the whole dataset into the (new) folder `root` (build_cached adds params.json)."""
    num_classes, seed = params["num_classes"], params["seed"]
    n_train, n_val = params["train_images"], params["val_images"]
    os.makedirs(os.path.join(root, "annotations"))
    splits = {}
    layout = (("train", n_train, 1), ("val", n_val, n_train + 1))  # split, images, first id
    for split, n, first_id in layout:
        plans = _scene_plans(split, num_classes, n, seed, _tail(params))
        splits[split] = _write_split(root, split, plans, first_id, params, 3 + SPLIT_KEYS[split])
    cats = _categories(num_classes, splits["train"][1])
    for split, (images, annotations) in splits.items():
        dataset = dict(
            info=dict(description="seesaw_ecm synthetic long-tailed set",
                      version=str(GENERATOR_VERSION)),
            licenses=[dict(id=1, name="CC0 1.0 (generated)",
                           url="https://creativecommons.org/publicdomain/zero/1.0/")],
            categories=cats,
            images=images,
            annotations=annotations,
        )
        _dump(dataset, os.path.join(root, "annotations", f"lvis_v1_{split}.json"))


def _tail(params):
    """The long-tail keywords of train_image_targets in `params` (absent: the defaults)."""
    return {k: (tuple(params[k]) if k == "rare_images" else params[k])
            for k in ("rare_share", "rare_images") if k in params}


def _read_params(out_dir):
    try:
        with open(os.path.join(out_dir, "params.json")) as f:
            return json.load(f)
    except (OSError, ValueError):
        return None


def _occupied(path):
    """Whether something other than an empty folder is at `path`."""
    return os.path.lexists(path) and not (os.path.isdir(path) and not os.listdir(path))


def _paths(out_dir):
    return dict(
        train_json=os.path.join(out_dir, "annotations", "lvis_v1_train.json"),
        val_json=os.path.join(out_dir, "annotations", "lvis_v1_val.json"),
        image_root=out_dir + os.sep,
    )


def generate(
    out_dir,
    num_classes=DEFAULTS["num_classes"],
    train_images=DEFAULTS["train_images"],
    val_images=DEFAULTS["val_images"],
    image_size=DEFAULTS["image_size"],
    seed=DEFAULTS["seed"],
    force=False,
    rare_share=RARE_SHARE,
    rare_images=RARE_TARGETS,
):
    """Generate (or reuse the cached) dataset; returns {"train_json", "val_json", "image_root"}.

    `image_root` is the absolute, symlink-resolved `out_dir` with a trailing separator
    (detectron2's `load_lvis_json` appends "<split>/<file>" from each image's coco_url).
    Built once, safely under concurrency: see build_cached.
    """
    params = dict(num_classes=num_classes, train_images=train_images, val_images=val_images,
                  image_size=image_size, seed=seed, version=GENERATOR_VERSION)
    # the tail keys only when not the defaults: a default set's params.json stays as it was
    if rare_share != RARE_SHARE:
        params["rare_share"] = rare_share
    if tuple(rare_images) != RARE_TARGETS:
        params["rare_images"] = list(rare_images)
    if force or _read_params(os.path.realpath(out_dir)) != params:
        if image_size < 64 or train_images < 1 or val_images < 1:
            raise ValueError(f"need image_size >= 64 and >= 1 train and val image: {params}")
        # raises early for infeasible sizes
        train_image_targets(num_classes, train_images, seed, **_tail(params))
    return _paths(build_cached(out_dir, params, _build, force))


def generate_holdout(out_dir, holdout_images=None, force=False, **params):
    """The held-out split of the set generate(out_dir, **params) makes (built first if needed):
    `holdout_images` (default: as many as val) balanced scenes drawn like val's from random
    streams of their own, image ids after the val ids, the train split's categories (counts,
    frequency groups). For choosing hyper-parameters (a calibration's gamma) on data that is
    neither trained on nor the test split. Written to `<out_dir>_holdout` (cached as `generate`
    caches, keyed on the set's parameters too); the set at `out_dir` is not changed.
    Returns {"holdout_json", "image_root"} (image_root as in `generate`)."""
    paths = ensure_generated(out_dir, **params)
    base = _read_params(os.path.realpath(out_dir))
    n = base["val_images"] if holdout_images is None else holdout_images
    if n < 1:
        raise ValueError(f"need >= 1 holdout image, got {n}")
    root = build_cached(os.path.realpath(out_dir) + "_holdout", dict(base, holdout_images=n),
                        lambda folder, p: _build_holdout(folder, p, paths["train_json"]), force)
    return dict(holdout_json=os.path.join(root, "annotations", "lvis_v1_holdout.json"),
                image_root=root + os.sep)


def _build_holdout(root, params, train_json):
    """Write the held-out split into the (new) folder `root`; info, licenses and categories
    are those of `train_json`."""
    os.makedirs(os.path.join(root, "annotations"))
    plans = _scene_plans("holdout", params["num_classes"], params["holdout_images"],
                         params["seed"])
    first_id = params["train_images"] + params["val_images"] + 1
    images, annotations = _write_split(root, "holdout", plans, first_id, params,
                                       3 + SPLIT_KEYS["holdout"])
    with open(train_json) as f:
        dataset = json.load(f)
    dataset.update(images=images, annotations=annotations)
    _dump(dataset, os.path.join(root, "annotations", "lvis_v1_holdout.json"))


def build_cached(out_dir, params, build, force=False):
    """Build a generated dataset at `out_dir` once: `build(folder, params)` writes it into a new
    folder, then params.json is written last. Returns the absolute, symlink-resolved `out_dir`.

    The folder is reused when its params.json equals `params` (unless `force`). Otherwise the
    set is built in a sibling `<out_dir>.tmp-<pid>` and renamed into place when complete, under
    an exclusive lock on `<out_dir>.lock`, so concurrent callers (DDP ranks) wait and then reuse
    it, and `out_dir` is never half written. Anything at `out_dir` other than an empty folder or
    a generated set (params.json) is left alone: FileExistsError.
    """
    out_dir = os.path.realpath(out_dir)  # a symlinked folder is rebuilt where it points
    if not force and _read_params(out_dir) == params:
        return out_dir
    os.makedirs(os.path.dirname(out_dir), exist_ok=True)
    with open(out_dir + ".lock", "w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)  # released when the file closes
        if not force and _read_params(out_dir) == params:  # another process just built it
            return out_dir
        if _read_params(out_dir) is None and _occupied(out_dir):
            raise FileExistsError(f"{out_dir} holds no generated dataset; not touching it")
        prefix = glob.escape(out_dir)
        for stale in glob.glob(prefix + ".tmp-*") + glob.glob(prefix + ".old-*"):
            shutil.rmtree(stale)  # left by a killed generator (none runs: we hold the lock)
        tmp = f"{out_dir}.tmp-{os.getpid()}"
        try:
            build(tmp, params)
            _dump(params, os.path.join(tmp, "params.json"))
        except BaseException:
            shutil.rmtree(tmp, ignore_errors=True)
            raise
        if os.path.lexists(out_dir):
            old = f"{out_dir}.old-{os.getpid()}"
            os.replace(out_dir, old)
            os.replace(tmp, out_dir)
            shutil.rmtree(old)
        else:
            os.replace(tmp, out_dir)
    return out_dir


def ensure_generated(out_dir, **params):
    """generate(out_dir, **params) without `force`: builds only if absent or the parameters
    (or the generator version) differ; otherwise returns at once (one small file read)."""
    if "force" in params:
        raise TypeError("ensure_generated() never forces; use generate(..., force=True)")
    return generate(out_dir, **params)
