"""Where is the signal? The base model's diffusion classifier on near-miss caption groups.

Soft tokens are the same for every prompt: they can only amplify a distinction the frozen model
already makes. For each GenEval-mini category this module asks whether the model *knows* the
distinction: a ground-truth image of a caption is scored against captions that differ from it
only in that category (its near-miss group), and counts as recognised when its own caption gives
the lowest denoising error summed over K evenly spread timesteps (the diffusion classifier). A
category is a fair target for the tokens when this accuracy is well above chance while the model
*draws* that category poorly (a low GenEval-mini score).

Near-miss groups (the true caption first; each group's order is shuffled per image):
- colour: the first object's colour replaced by every other colour (up to 4 captions);
- shape: the first object's shape replaced by every other shape (3);
- count: the same object with every number 1-4 (count scenes of 2-4 objects, as GenEval);
- binding: relation scenes, the two objects' colours swapped, and their shapes swapped (3);
- position: relation scenes, "left of" and "right of" exchanged (2).
Ties count fractionally (1/k when the true caption is among k equal minima), so a model that
ignores the text scores exactly chance.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np
import torch

from . import world

CATEGORIES = ("colour", "shape", "count", "binding", "position")
# K = 20, chosen on the shipped model (validation seed 5, 192 groups per category; K evenly spaced timesteps of the
# grid 12, 37, ..., 987): the accuracy rose with K (count 0.818 / 0.875 / 0.932 / 0.943 at K = 5 / 10 / 20 / 40,
# binding 0.656 / 0.661 / 0.719 / 0.729, colour 0.938 / 0.964 / 0.969 / 0.974); at 20 every category but
# position (0.589 / 0.526 / 0.536 / 0.599, within its noise) is within 0.015 of K = 40.
# Five timesteps (the demo's earlier probe) under-measure what the model knows.
DEFAULT_K = 20


def stratified_timesteps(k: int = DEFAULT_K) -> tuple:
    """The midpoints of k equal strata of 0..999: (25, 75, ..., 975) for k = 20."""
    if not 1 <= k <= 1000:
        raise ValueError(f"k must be in 1..1000, got {k}")
    return tuple(int((i + 0.5) * 1000 / k) for i in range(k))


DEFAULT_TS = stratified_timesteps()


def near_miss_group(spec: world.Spec, category: str) -> list | None:
    """[spec, near misses...] differing from ``spec`` only in ``category``; None if it does not apply."""
    if category not in CATEGORIES:
        raise ValueError(f"unknown category {category!r}; expected one of {CATEGORIES}")
    (c0, s0) = spec.objects[0]
    if category in ("colour", "shape"):
        values = world.COLOURS if category == "colour" else world.SHAPES
        out = [spec]
        for v in values:
            obj = (v, s0) if category == "colour" else (c0, v)
            if obj == spec.objects[0] or (spec.kind == "relation" and obj == spec.objects[1]):
                continue
            out.append(replace(spec, objects=(obj,) + tuple(spec.objects[1:])))
        return out
    if category == "count":
        if spec.kind != "count" or spec.count < 2:
            return None
        return [spec] + [replace(spec, count=n) for n in world.NUMBERS if n != spec.count]
    if spec.kind != "relation":
        return None
    (c1, s1) = spec.objects[1]
    if category == "position":
        other = "right of" if spec.relation == "left of" else "left of"
        return [spec, replace(spec, relation=other)]
    out = [spec]
    for objs in (((c1, s0), (c0, s1)), ((c0, s1), (c1, s0))):  # colours swapped, shapes swapped
        if objs[0] != objs[1] and objs != spec.objects:
            cand = replace(spec, objects=objs)
            if cand not in out:
                out.append(cand)
    return out if len(out) > 1 else None


@torch.no_grad()
def near_miss_accuracy(backend, encode, category: str, n: int = 96, split: str = "train", seed: int = 0,
                       ts=DEFAULT_TS, chunk: int = 256) -> dict:
    """The diffusion classifier's accuracy on ``n`` near-miss groups of ``category`` (see module doc).

    Images are fresh ground-truth renders of captions drawn from ``split`` (only specs the
    category applies to). Returns {"accuracy", "chance", "se", "n"}; se is the accuracy's standard
    error over the groups.
    """
    from .pretrain import images_to_latents, to_model_images

    rng = np.random.default_rng([seed, CATEGORIES.index(category)])
    candidates = [s for s in world.split_specs(split) if near_miss_group(s, category)]
    specs = [candidates[i] for i in rng.integers(len(candidates), size=n)]
    groups = []
    for s in specs:
        g = near_miss_group(s, category)
        groups.append([g[i] for i in rng.permutation(len(g))])
    imgs = np.stack([world.render(s, [seed, 7, i])[0] for i, s in enumerate(specs)])
    x0 = images_to_latents(to_model_images(imgs)).to(backend.device)
    # one (image, caption) pair per group member, image-major
    img_idx = torch.tensor([i for i, g in enumerate(groups) for _ in g])
    caps = [c.caption for g in groups for c in g]
    cond = {"context": encode(caps).to(backend.device)}
    gen = torch.Generator().manual_seed(seed)
    err = torch.zeros(len(caps))
    for t in ts:
        noise = torch.randn(x0.shape, generator=gen).to(x0)  # one noise per image, shared by its captions
        tt = torch.full((len(caps),), int(t), dtype=torch.long)
        x, eps = x0[img_idx], noise[img_idx]
        z, u = backend.noisy(x, eps, tt), backend.target(x, eps, tt)
        for s in range(0, len(caps), chunk):
            sl = slice(s, s + chunk)
            pred = backend.predict(z[sl], tt[sl], {k: v[sl] for k, v in cond.items()}, None)
            err[sl] += (pred.float() - u[sl].float()).square().flatten(1).mean(1).cpu()
    credit, chance, start = [], 0.0, 0
    for s, g in zip(specs, groups):
        e = err[start:start + len(g)]
        start += len(g)
        minima = (e == e.min()).nonzero().flatten().tolist()
        credit.append((g.index(s) in minima) / len(minima))
        chance += 1.0 / len(g)
    se = float(np.std(credit, ddof=1) / np.sqrt(n)) if n > 1 else float("nan")
    return {"accuracy": float(np.mean(credit)), "chance": chance / n, "se": se, "n": n}


def diagnose(backend, encode, n: int = 96, split: str = "train", seed: int = 0, ts=DEFAULT_TS) -> dict:
    """{category: near_miss_accuracy(...)} for every category."""
    return {c: near_miss_accuracy(backend, encode, c, n=n, split=split, seed=seed, ts=ts) for c in CATEGORIES}


def fair_targets(diag: dict, geneval: dict, margin: float = 0.1, low: float = 0.6) -> list:
    """Categories where the classifier is at least ``margin`` above chance and the drawn score is <= ``low``."""
    return [c for c in CATEGORIES
            if diag[c]["accuracy"] >= diag[c]["chance"] + margin and geneval.get(c, float("nan")) <= low]
