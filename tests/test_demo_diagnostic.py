"""The near-miss diagnostic: groups differ in exactly one category; a text-blind model scores chance."""

import pytest
import torch

from training.demo import world
from training.demo.diagnostic import (CATEGORIES, fair_targets, near_miss_accuracy, near_miss_group,
                                     stratified_timesteps)
from training.demo.geneval_mini import detect, score


def test_groups_differ_only_in_their_category():
    count = world.Spec("count", (("red", "circle"),), 3)
    rel = world.Spec("relation", (("red", "circle"), ("blue", "square")), relation="left of")
    g = near_miss_group(count, "count")
    assert g[0] == count and sorted(s.count for s in g) == [1, 2, 3, 4]
    assert near_miss_group(world.Spec("count", (("red", "circle"),), 1), "count") is None
    assert [s.objects[0][0] for s in near_miss_group(count, "colour")] == ["red", "green", "blue", "yellow"]
    assert len(near_miss_group(count, "shape")) == 3
    assert [s.relation for s in near_miss_group(rel, "position")] == ["left of", "right of"]
    binding = near_miss_group(rel, "binding")
    assert [s.caption for s in binding] == ["a red circle left of a blue square", "a blue circle left of a red square",
                                           "a red square left of a blue circle"]
    # a colour swap of two same-coloured objects is no near miss
    same = world.Spec("relation", (("red", "circle"), ("red", "square")), relation="left of")
    assert [s.caption for s in near_miss_group(same, "binding")] == [same.caption, "a red square left of a red circle"]
    assert near_miss_group(count, "binding") is None and near_miss_group(count, "position") is None
    for cat in ("colour", "shape"):  # a relation's first object never becomes the second one
        for s in near_miss_group(same, cat):
            assert s.objects[0] != s.objects[1]
    # every near miss is a different image under GenEval-mini's rules: the truth's render fails it
    img = world.render(rel, 0)[0][None]
    for cat in ("binding", "position"):
        for miss in near_miss_group(rel, cat)[1:]:
            assert not score(detect(img[0]), miss)["overall"], (cat, miss.caption)


class TextBlind:
    """A backend whose prediction ignores the conditioning."""
    device = torch.device("cpu")

    def noisy(self, x0, noise, t):
        return x0 + noise

    def target(self, x0, noise, t):
        return noise

    def predict(self, z, t, cond, tokens=None, set_index=0):
        return torch.zeros_like(z)


def fake_encode(captions):
    g = torch.Generator().manual_seed(len(captions))
    return torch.randn(len(captions), 4, 8, generator=g)


@pytest.mark.parametrize("category", CATEGORIES)
def test_a_text_blind_model_scores_exactly_chance(category):
    r = near_miss_accuracy(TextBlind(), fake_encode, category, n=24, ts=(500,))
    assert r["accuracy"] == pytest.approx(r["chance"], abs=1e-9)
    assert 0.2 < r["chance"] <= 0.5
    if category == "position":  # every group is a pair: credit 1/2 for each image, no spread
        assert r["se"] == pytest.approx(0.0, abs=1e-12)


def test_stratified_timesteps():
    assert stratified_timesteps(5) == (100, 300, 500, 700, 900)  # the earlier fixed probe
    ts = stratified_timesteps(20)
    assert ts[:3] == (25, 75, 125) and ts[-1] == 975 and len(ts) == 20
    with pytest.raises(ValueError):
        stratified_timesteps(0)


def test_fair_targets():
    diag = {c: {"accuracy": 0.3, "chance": 0.25} for c in CATEGORIES}
    diag["count"] = {"accuracy": 0.55, "chance": 0.25}
    diag["colour"] = {"accuracy": 0.9, "chance": 0.25}
    assert fair_targets(diag, {"count": 0.4, "colour": 0.9, "binding": 0.4}) == ["count"]
