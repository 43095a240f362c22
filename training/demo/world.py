"""The demo world: captioned 32x32 images of coloured shapes, generated from a seed.

Two kinds of scene, each described by a ``Spec``:
- count scenes: N copies of one object type, "two red circles" (N = 1..4);
- relation scenes: two different objects side by side, "a blue square left of a yellow triangle".

Everything is deterministic: ``sample_specs(seed, n, split)`` and ``render(spec, seed)`` depend
only on their arguments. A fixed, seeded set of attribute combinations (``HELDOUT``) never
appears in the "train" split; the "heldout" split draws only from it.
"""

from __future__ import annotations

import functools
import re
from dataclasses import dataclass

import numpy as np

SIZE = 32
COLOURS = {  # RGB 0..255, far apart from each other and from black
    "red": (230, 40, 40),
    "green": (40, 200, 60),
    "blue": (50, 90, 245),
    "yellow": (240, 220, 40),
}
SHAPES = ("circle", "square", "triangle")
NUMBERS = {1: "one", 2: "two", 3: "three", 4: "four"}
RELATIONS = ("left of", "right of")
BACKGROUND = (0, 0, 0)
# Box side (px) by number of objects. Four objects are a little smaller than three, which loosens
# their near-2x2 layout a bit (6% of layouts are not a 2x2 grid, against 1% at 9.5-11 px); the
# fixed 2x2 layout made "four" the easiest count to learn.
OBJ_SIZE = {1: (12.0, 15.0), 2: (11.0, 13.0), 3: (9.5, 11.5), 4: (8.5, 10.5)}
MIN_GAP = 2.0  # pixels between object bounding boxes
SUPERSAMPLE = 4

OBJECTS = tuple((c, s) for c in COLOURS for s in SHAPES)


@dataclass(frozen=True)
class Spec:
    """What a caption asks for.

    kind: "count" (``count`` copies of ``objects[0]``) or "relation" (``objects[0]`` is
    ``relation`` -- "left of" / "right of" -- ``objects[1]``). Objects are (colour, shape).
    """

    kind: str
    objects: tuple
    count: int = 1
    relation: str | None = None

    def __post_init__(self):
        for c, s in self.objects:
            if c not in COLOURS or s not in SHAPES:
                raise ValueError(f"unknown object {c!r} {s!r}")
        if self.kind == "count":
            if len(self.objects) != 1 or self.count not in NUMBERS:
                raise ValueError(f"a count spec needs one object and count 1..{max(NUMBERS)}, got {self}")
        elif self.kind == "relation":
            if len(self.objects) != 2 or self.relation not in RELATIONS or self.objects[0] == self.objects[1]:
                raise ValueError(f"a relation spec needs two different objects and a relation, got {self}")
        else:
            raise ValueError(f"unknown spec kind {self.kind!r}")

    @property
    def caption(self) -> str:
        if self.kind == "count":
            (c, s), n = self.objects[0], self.count
            return f"{NUMBERS[n]} {c} {s}{'s' if n > 1 else ''}"
        (c1, s1), (c2, s2) = self.objects
        return f"a {c1} {s1} {self.relation} a {c2} {s2}"

    def expected(self) -> list:
        """Objects the image must contain, as (colour, shape) with multiplicity."""
        return list(self.objects) * self.count if self.kind == "count" else list(self.objects)


def all_specs() -> list:
    """Every spec of the world (48 count scenes, 264 relation scenes), in a fixed order."""
    out = [Spec("count", (o,), n) for o in OBJECTS for n in NUMBERS]
    out += [Spec("relation", (a, b), relation=r) for a in OBJECTS for b in OBJECTS if a != b for r in RELATIONS]
    return out


def _heldout() -> frozenset:
    # Held out: 8 (object, count) combinations and 24 unordered object pairs (both relations,
    # both orders). Every colour, shape, number and relation word still occurs in training.
    rng = np.random.default_rng(20261123)
    counts = [s for s in all_specs() if s.kind == "count"]
    held = {counts[i] for i in rng.choice(len(counts), 8, replace=False)}
    pairs = sorted({tuple(sorted(s.objects)) for s in all_specs() if s.kind == "relation"})
    for i in rng.choice(len(pairs), 24, replace=False):
        a, b = pairs[i]
        held |= {Spec("relation", (x, y), relation=r) for x, y in ((a, b), (b, a)) for r in RELATIONS}
    return frozenset(held)


HELDOUT = _heldout()


def split_specs(split: str) -> list:
    """The specs of a split: "train", "heldout" or "all"."""
    if split == "all":
        return all_specs()
    if split == "train":
        return [s for s in all_specs() if s not in HELDOUT]
    if split == "heldout":
        return [s for s in all_specs() if s in HELDOUT]
    raise ValueError(f"unknown split {split!r}; expected 'train', 'heldout' or 'all'")


def sample_specs(seed: int, n: int, split: str = "train", p_count: float = 0.5) -> list:
    """n specs drawn with replacement: count scenes with probability p_count, else relations."""
    if not 0.0 <= p_count <= 1.0:
        raise ValueError(f"p_count is a probability in [0, 1], got {p_count}")
    specs = split_specs(split)
    counts = [s for s in specs if s.kind == "count"]
    rels = [s for s in specs if s.kind == "relation"]
    rng = np.random.default_rng([seed, 1])
    kinds = rng.random(n) < p_count
    return [counts[rng.integers(len(counts))] if k else rels[rng.integers(len(rels))] for k in kinds]


@functools.lru_cache(maxsize=None)
def _split_set(split: str) -> frozenset:
    return frozenset(split_specs(split))


def degrade(spec: Spec, rng: np.random.Generator, p_count: float = 0.0, p_binding: float = 0.0,
            p_position: float = 0.0, split: str | None = None) -> Spec:
    """A web-like, sometimes wrong caption spec for an image of ``spec`` (the image is unchanged).

    Count scenes: with probability p_count the number becomes another of 1..4 (uniformly).
    Relation scenes, independently: with probability p_binding the two objects' colours are
    swapped ("a red circle left of a blue square" -> "a blue circle left of a red square"; a
    no-op when both colours are equal), with probability p_position the relation is flipped.
    With ``split``, a wrong spec outside that split (e.g. a held-out combination) is not used:
    the count falls back to another wrong number in the split (else unchanged), a colour swap is
    skipped. Always draws the same random numbers per spec (1 for "which", 3 uniforms), so the
    stream of ``rng`` does not depend on the rates; all rates 0 return ``spec`` itself.
    """
    for name, p in (("p_count", p_count), ("p_binding", p_binding), ("p_position", p_position)):
        if not 0.0 <= p <= 1.0:
            raise ValueError(f"{name} is a probability in [0, 1], got {p}")
    u = rng.random(3)
    pick = rng.integers(1 << 30)
    allowed = None if split is None else _split_set(split)
    if spec.kind == "count":
        if u[0] < p_count:
            others = [Spec("count", spec.objects, n) for n in NUMBERS if n != spec.count]
            if allowed is not None:
                others = [o for o in others if o in allowed]
            if others:
                return others[pick % len(others)]
        return spec
    out = spec
    if u[1] < p_binding:
        (c0, s0), (c1, s1) = spec.objects
        swapped = Spec("relation", ((c1, s0), (c0, s1)), relation=spec.relation)
        if allowed is None or swapped in allowed:
            out = swapped
    if u[2] < p_position:
        out = Spec("relation", out.objects, relation="right of" if out.relation == "left of" else "left of")
    return out


# --- rendering --------------------------------------------------------------------------------

def _mask(shape: str, cx: float, cy: float, side: float, xs, ys) -> np.ndarray:
    """Boolean mask of one shape (bounding box ``side`` centred on cx, cy) on grid xs, ys."""
    h = side / 2
    if shape == "circle":
        return (xs - cx) ** 2 + (ys - cy) ** 2 <= h * h
    if shape == "square":
        h *= 0.88  # equalise areas a little: a full-box square looks much bigger
        return (abs(xs - cx) <= h) & (abs(ys - cy) <= h)
    # upright isosceles triangle: apex at top centre, base at the bottom of the box
    top, bottom = cy - h, cy + h
    inside_y = (ys >= top) & (ys <= bottom)
    half_width = h * (ys - top) / side
    return inside_y & (abs(xs - cx) <= half_width)


def layout_objects(spec: Spec, rng: np.random.Generator) -> list:
    """Place the spec's objects: list of (colour, shape, cx, cy, side) in pixel units."""
    objs = spec.expected()
    lo, hi = OBJ_SIZE[len(objs)]
    for _ in range(1000):
        sides = rng.uniform(lo, hi, size=len(objs))
        if spec.kind == "relation":
            # objects[0] is left of objects[1] for "left of", right of it for "right of"
            a, b = (0, 1) if spec.relation == "left of" else (1, 0)
            xa = rng.uniform(1 + sides[a] / 2, SIZE / 2 - MIN_GAP / 2 - sides[a] / 2)
            xb = rng.uniform(SIZE / 2 + MIN_GAP / 2 + sides[b] / 2, SIZE - 1 - sides[b] / 2)
            ys = [rng.uniform(1 + z / 2, SIZE - 1 - z / 2) for z in sides]
            pos = [None, None]
            pos[a], pos[b] = np.array([xa, ys[a]]), np.array([xb, ys[b]])
            return [(c, s, float(p[0]), float(p[1]), float(z)) for (c, s), p, z in zip(objs, pos, sides)]
        pos = []
        for z in sides:  # sequential rejection sampling of non-overlapping boxes
            for _ in range(100):
                p = rng.uniform(1 + z / 2, SIZE - 1 - z / 2, size=2)
                if all(np.abs(p - q).max() >= (z + zq) / 2 + MIN_GAP for q, zq in zip(pos, sides)):
                    pos.append(p)
                    break
            else:
                break
        if len(pos) == len(objs):
            return [(c, s, float(p[0]), float(p[1]), float(z)) for (c, s), p, z in zip(objs, pos, sides)]
    raise RuntimeError(f"could not place {spec}")  # not reached for this world's sizes


_GRID = None


def _grid():
    global _GRID
    if _GRID is None:
        k = SUPERSAMPLE
        c = (np.arange(SIZE * k) + 0.5) / k
        _GRID = np.meshgrid(c, c)
    return _GRID


def render_objects(objects: list) -> np.ndarray:
    """Anti-aliased uint8 (32, 32, 3) image of placed objects on the black background."""
    xs, ys = _grid()
    k = SUPERSAMPLE
    img = np.zeros((SIZE * k, SIZE * k, 3), np.float32) + np.array(BACKGROUND, np.float32)
    for c, s, cx, cy, side in objects:
        img[_mask(s, cx, cy, side, xs, ys)] = COLOURS[c]
    img = img.reshape(SIZE, k, SIZE, k, 3).mean(axis=(1, 3))
    return np.round(img).astype(np.uint8)


def render(spec: Spec, seed) -> tuple:
    """(uint8 image (32, 32, 3), placed objects) for a spec; deterministic in seed."""
    objs = layout_objects(spec, np.random.default_rng(seed))
    return render_objects(objs), objs


def make_batch(seed: int, index: int, n: int, split: str = "train", p_count: float = 0.5) -> tuple:
    """Batch ``index`` of the training stream of ``seed``: (uint8 (n, 32, 32, 3), specs)."""
    specs = sample_specs(seed * 1_000_003 + index, n, split, p_count)
    imgs = [render(s, [seed, index, i])[0] for i, s in enumerate(specs)]
    return np.stack(imgs), specs


# --- captions -> specs ------------------------------------------------------------------------

_WORDS = {"a": 1, "an": 1, **{word: n for n, word in NUMBERS.items()}}


def parse_caption(text: str) -> Spec:
    """The Spec of a caption in this world's grammar (inverse of ``Spec.caption``)."""
    words = re.findall(r"[a-z]+", text.lower())
    colour = "|".join(COLOURS)
    shape = "|".join(SHAPES)
    joined = " ".join(words)
    m = re.fullmatch(rf"({'|'.join(_WORDS)}) ({colour}) ({shape})s?", joined)
    if m:
        n = _WORDS[m.group(1)]
        return Spec("count", ((m.group(2), m.group(3)),), n)
    m = re.fullmatch(rf"(?:a|an|one) ({colour}) ({shape}) (left of|right of|to the left of|to the right of) "
                     rf"(?:a|an|one) ({colour}) ({shape})", joined)
    if m:
        rel = "left of" if "left" in m.group(3) else "right of"
        return Spec("relation", ((m.group(1), m.group(2)), (m.group(4), m.group(5))), relation=rel)
    raise ValueError(f"caption {text!r} is not in the demo world's grammar "
                     f"(e.g. 'two red circles', 'a blue square left of a yellow triangle')")


def vocabulary() -> list:
    """Every word a caption of this world can use, sorted."""
    words = set(_WORDS) | set(COLOURS) | {"left", "right", "of", "to", "the"}
    words |= set(SHAPES) | {s + "s" for s in SHAPES}
    return sorted(words)
