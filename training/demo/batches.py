"""Token-training batches for the demo: near-miss groups instead of random captions.

SoftREPA's loss compares every image of a batch with every caption of it, so a batch only
teaches the distinctions its captions differ in. Random batches of this world mostly differ in
colour and shape, which the model already draws right. A near-miss batch holds B renders whose
captions differ in one hard category only:
- count: the same object, one to four of it ("one red circle" ... "four red circles"; where one
  number of an object is held out, another count caption fills the fourth place);
- relation: the same two objects as caption, with the colours swapped, the shapes swapped, and
  the relation flipped (binding and position).
This is a deviation from the papers' random batches (documented in the demo report). Every
batch is a function of (seed, step) and every image a fresh render, so resuming reproduces a
run and no render is shown twice.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from . import world
from .pretrain import images_to_latents, to_model_images

KINDS = ("count", "relation")


def count_group(spec: world.Spec) -> list:
    """The object of a count scene at every number 1..4."""
    return [replace(spec, count=n) for n in world.NUMBERS]


def relation_group(spec: world.Spec) -> list:
    """A relation scene, its colour swap, its shape swap and its flipped relation (None entries when invalid)."""
    (c0, s0), (c1, s1) = spec.objects
    flipped = "right of" if spec.relation == "left of" else "left of"
    out = [spec]
    for objs in (((c1, s0), (c0, s1)), ((c0, s1), (c1, s0))):  # no near miss when the swap changes nothing
        out.append(replace(spec, objects=objs) if objs[0] != objs[1] and objs != spec.objects else None)
    out.append(replace(spec, relation=flipped))
    return out


class NearMissData:
    """``batch(step, generator) -> (x0, {"context"})`` for the Trainer (see module docstring).

    Each step draws count or relation (``p_count``), then a group whose every caption lies in
    ``split``; ``p_near`` < 1 mixes in random batches of the split.
    """

    def __init__(self, encode, batch: int = 4, seed: int = 0, split: str = "train", p_near: float = 1.0,
                 p_count: float = 0.5):
        if batch != 4:
            raise ValueError(f"near-miss groups hold 4 captions; batch must be 4, got {batch}")
        self.encode, self.batch_size, self.seed, self.split = encode, batch, seed, split
        self.p_near, self.p_count = p_near, p_count
        allowed = set(world.split_specs(split))
        self.counts = sorted((s for s in allowed if s.kind == "count"), key=repr)
        # an object's numbers that are in the split (at least 3 of 4: held-out combinations are missing)
        groups = {tuple(g for g in count_group(s) if g in allowed) for s in self.counts}
        self.count_groups = sorted((g for g in groups if len(g) >= 3), key=repr)
        self.relation_groups = sorted({tuple(g) for s in allowed if s.kind == "relation"
                                       for g in [relation_group(s)] if all(x in allowed for x in g)}, key=repr)
        if not self.count_groups or not self.relation_groups:
            raise ValueError(f"the {split} split has no complete near-miss groups")

    def specs(self, step: int) -> list:
        """The 4 captions' specs of a step."""
        rng = np.random.default_rng([self.seed, step, 4242])
        if rng.random() >= self.p_near:
            return world.sample_specs(self.seed * 1_000_003 + step, self.batch_size, self.split)
        groups = self.count_groups if rng.random() < self.p_count else self.relation_groups
        group = list(groups[rng.integers(len(groups))])
        while len(group) < self.batch_size:  # an object with a held-out number: another object fills in
            group.append(self.counts[rng.integers(len(self.counts))])
        return group

    def batch(self, step: int, generator=None):
        specs = self.specs(step)
        imgs = np.stack([world.render(s, [self.seed, step, i, 17])[0] for i, s in enumerate(specs)])
        x0 = images_to_latents(to_model_images(imgs))
        return x0, {"context": self.encode([s.caption for s in specs])}

