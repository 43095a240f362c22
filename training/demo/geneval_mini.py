"""GenEval-mini: an exact, detector-free evaluator for images of the demo world.

Plain image processing (numpy only), robust to tinted and noisy backgrounds:
1. background colour = per-channel median of the 2-pixel border ring;
2. a light 3x3 binomial blur;
3. foreground = pixels whose colour differs from the background by more than ``FG_DIST``;
4. each foreground pixel gets the palette colour whose direction from the background is
   closest (cosine of pixel - background vs palette - background), so edge pixels blended
   with any background keep their colour;
5. 4-connected components of equal colour, at least ``MIN_AREA`` pixels, are objects;
6. shape = the template (square, circle, upright triangle) of the component's area and
   centroid with the highest IoU.

Scoring against a ``world.Spec`` (``score``), per image:
- colour: every requested colour is present; shape: every requested shape is present;
- count (count scenes of two or more objects, as GenEval's counting prompts use 2-4): the
  number of objects equals the requested number. "one red circle" is a single-object prompt:
  its colour, shape and overall (exactly one such object) are scored, its count is not;
- binding (relation scenes): both requested (colour, shape) objects are present;
- position (relation scenes): both are present and objects[0] lies left/right of objects[1];
- overall: every applicable check passes (count scenes: also no object of another kind).
"""

from __future__ import annotations

import numpy as np

from . import world

FG_DIST = 0.25  # Euclidean RGB distance (0..1 units) from the background
MIN_COS = 0.85  # minimum cosine to the best palette direction
MIN_AREA = 15  # pixels
CATEGORIES = ("colour", "shape", "count", "binding", "position", "overall")

_NAMES = list(world.COLOURS)
_PALETTE = np.array([world.COLOURS[c] for c in _NAMES], np.float32) / 255.0


def as_uint8_images(images) -> np.ndarray:
    """Accept uint8 (N, H, W, 3) arrays or float tensors/arrays (N, 3, H, W) in [-1, 1]."""
    if hasattr(images, "detach"):
        images = images.detach().cpu().float().numpy()
    images = np.asarray(images)
    if images.ndim == 3:
        images = images[None]
    if images.ndim != 4:
        raise ValueError(f"expected images (N, H, W, 3) uint8 or (N, 3, H, W) float, got shape {images.shape}")
    if images.dtype == np.uint8:
        if images.shape[-1] != 3:
            raise ValueError(f"uint8 images must be (N, H, W, 3), got {images.shape}")
        return images
    if images.shape[1] != 3:
        raise ValueError(f"float images must be (N, 3, H, W) in [-1, 1], got {images.shape}")
    return np.round((np.clip(images, -1, 1) + 1) * 127.5).astype(np.uint8).transpose(0, 2, 3, 1)


def _blur(img: np.ndarray) -> np.ndarray:
    p = np.pad(img, ((1, 1), (1, 1), (0, 0)), mode="edge")
    rows = p[:-2] + 2 * p[1:-1] + p[2:]
    return (rows[:, :-2] + 2 * rows[:, 1:-1] + rows[:, 2:]) / 16.0


def _components(cls: np.ndarray) -> np.ndarray:
    """4-connected components of equal nonzero class: label map (0 = none) by min-propagation."""
    h, w = cls.shape
    big = h * w + 1
    lab = np.where(cls > 0, np.arange(1, h * w + 1).reshape(h, w), big)
    while True:
        new = lab.copy()
        for dy, dx in ((0, 1), (0, -1), (1, 0), (-1, 0)):
            nb = np.full_like(lab, big)
            same = np.zeros_like(cls, bool)
            ys = slice(max(dy, 0), h + min(dy, 0))
            yd = slice(max(-dy, 0), h + min(-dy, 0))
            xs = slice(max(dx, 0), w + min(dx, 0))
            xd = slice(max(-dx, 0), w + min(-dx, 0))
            nb[yd, xd] = lab[ys, xs]
            same[yd, xd] = cls[ys, xs] == cls[yd, xd]
            new = np.where(same & (cls > 0), np.minimum(new, nb), new)
        if np.array_equal(new, lab):
            return np.where(cls > 0, lab, 0)
        lab = new


def _templates(mask: np.ndarray) -> dict:
    """Ideal square, circle and upright triangle with the mask's area and centroid.

    Fitting by area and centroid (not bounding box) keeps stray noisy pixels from distorting
    the templates. The triangle is the world's: base = height, apex up, centroid 1/3 up.
    """
    h, w = mask.shape
    ys, xs = np.mgrid[0:h, 0:w] + 0.5
    my, mx = np.nonzero(mask)
    cx, cy, area = mx.mean() + 0.5, my.mean() + 0.5, float(mask.sum())
    half = np.sqrt(area) / 2
    square = (np.abs(xs - cx) <= half) & (np.abs(ys - cy) <= half)
    circle = (xs - cx) ** 2 + (ys - cy) ** 2 <= area / np.pi
    height = np.sqrt(2 * area)
    top = cy - 2 * height / 3
    tri = (ys >= top) & (ys <= top + height) & (np.abs(xs - cx) <= (ys - top) / 2)
    return {"square": square, "circle": circle, "triangle": tri}


def detect(image: np.ndarray) -> list:
    """Objects in one uint8 (H, W, 3) image: dicts with colour, shape, x, y (centroid), area."""
    f = image.astype(np.float32) / 255.0
    ring = np.concatenate([f[:2].reshape(-1, 3), f[-2:].reshape(-1, 3), f[2:-2, :2].reshape(-1, 3),
                           f[2:-2, -2:].reshape(-1, 3)])
    bg = np.median(ring, axis=0)
    v = _blur(f) - bg
    norm = np.linalg.norm(v, axis=-1)
    dirs = _PALETTE - bg
    dirs /= np.linalg.norm(dirs, axis=-1, keepdims=True) + 1e-6
    cos = (v @ dirs.T) / (norm[..., None] + 1e-6)
    best = cos.argmax(-1)
    cls = np.where((norm > FG_DIST) & (cos.max(-1) >= MIN_COS), best + 1, 0)
    lab = _components(cls)
    objs = []
    for label in np.unique(lab[lab > 0]):
        m = lab == label
        area = int(m.sum())
        if area < MIN_AREA:
            continue
        ys, xs = np.nonzero(m)
        ious = {k: (m & t).sum() / (m | t).sum() for k, t in _templates(m).items()}
        objs.append({"colour": _NAMES[int(cls[ys[0], xs[0]]) - 1], "shape": max(ious, key=ious.get),
                     "x": float(xs.mean() + 0.5), "y": float(ys.mean() + 0.5), "area": area})
    return objs


def score(objects: list, spec: world.Spec) -> dict:
    """Per-category pass/fail (bool) of detected objects against a spec; only applicable keys."""
    kinds = [(o["colour"], o["shape"]) for o in objects]
    want = spec.objects
    out = {"colour": all(any(o["colour"] == c for o in objects) for c, _ in want),
           "shape": all(any(o["shape"] == s for o in objects) for _, s in want)}
    if spec.kind == "count":
        right_number = len(objects) == spec.count
        if spec.count >= 2:
            out["count"] = right_number
        out["overall"] = right_number and all(k == want[0] for k in kinds)
    else:
        out["binding"] = all(w in kinds for w in want)
        pos = False
        if out["binding"]:
            # the largest object of each requested kind
            a, b = (max((o for o in objects if (o["colour"], o["shape"]) == w), key=lambda o: o["area"])
                    for w in want)
            pos = a["x"] < b["x"] if spec.relation == "left of" else a["x"] > b["x"]
        out["position"] = pos
        out["overall"] = out["binding"] and pos and out["colour"] and out["shape"]
    return out


def _as_specs(specs) -> list:
    """Specs from ``world.Spec`` objects or captions."""
    return [world.parse_caption(s) if isinstance(s, str) else s for s in specs]


def evaluate(images, specs, details: bool = False):
    """Per-category accuracy of images (see ``as_uint8_images``) against specs (or captions).

    Returns {category: accuracy} over the images where the category applies (count: count
    scenes of 2+ objects; binding, position: relation scenes); with details=True also the per-image
    results and detections.
    """
    imgs = as_uint8_images(images)
    specs = _as_specs(specs)
    if len(imgs) != len(specs):
        raise ValueError(f"{len(imgs)} images but {len(specs)} specs")
    per, found = [], []
    for img, spec in zip(imgs, specs):
        objs = detect(img)
        found.append(objs)
        per.append(score(objs, spec))
    acc = {}
    for cat in CATEGORIES:
        vals = [r[cat] for r in per if cat in r]
        if vals:
            acc[cat] = float(np.mean(vals))
    return (acc, per, found) if details else acc


def count_misses(found: list, specs) -> dict:
    """Shares of the count scenes of 2+ objects drawn with too few and with too many objects.

    found: ``detect`` results per image (``evaluate(..., details=True)[2]``). Copies drawn
    touching merge into one component, so "fewer" includes merged copies.
    """
    specs = _as_specs(specs)
    pairs = [(len(objs), s.count) for objs, s in zip(found, specs) if s.kind == "count" and s.count >= 2]
    if not pairs:
        return {"fewer": float("nan"), "more": float("nan")}
    return {"fewer": float(np.mean([n < c for n, c in pairs])), "more": float(np.mean([n > c for n, c in pairs]))}


def perturb(images: np.ndarray, seed: int = 0, noise: float = 0.08, tint: float = 0.3,
            blur: bool = True) -> np.ndarray:
    """Noisy versions of clean renders: a random background tint, Gaussian noise, slight blur."""
    rng = np.random.default_rng(seed)
    out = []
    for img in as_uint8_images(images):
        f = img.astype(np.float32) / 255.0
        bgmask = (f.max(-1, keepdims=True) < 0.05).astype(np.float32)
        f = f + bgmask * rng.uniform(0, tint, size=3) + rng.uniform(-0.05, 0.05, size=3)
        if blur:
            f = 0.5 * f + 0.5 * _blur(f)
        f = f + rng.normal(0, noise, size=f.shape)
        out.append(np.round(np.clip(f, 0, 1) * 255).astype(np.uint8))
    return np.stack(out)
