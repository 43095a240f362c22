"""Web-like degraded captions for pretraining (``world.degrade``, pretrain's degrade_* options)."""

import math

import numpy as np
import pytest
import torch

from training.demo import batches
from training.demo import pretrain as P
from training.demo import world

N = 20_000
RATE = 0.3


def _within(k: int, n: int, p: float, sigmas: float = 4.0) -> bool:
    return abs(k / n - p) <= sigmas * math.sqrt(p * (1 - p) / n)


@pytest.fixture(scope="module")
def sample():
    specs = world.sample_specs(123, N, "all", p_count=0.5)
    rng = np.random.default_rng(7)
    out = [world.degrade(s, rng, p_count=RATE, p_binding=RATE, p_position=RATE) for s in specs]
    return specs, out


def test_degrade_rates(sample):
    specs, out = sample
    counts = [(s, d) for s, d in zip(specs, out) if s.kind == "count"]
    rels = [(s, d) for s, d in zip(specs, out) if s.kind == "relation"]
    assert len(counts) > 8000 and len(rels) > 8000
    # count scenes: only the number changes, to another of 1..4, uniformly
    assert all(d.kind == "count" and d.objects == s.objects for s, d in counts)
    wrong = [(s, d) for s, d in counts if d.count != s.count]
    assert _within(len(wrong), len(counts), RATE)
    for off in (1, 2, 3):
        k = sum((d.count - s.count) % 4 == off for s, d in wrong)
        assert _within(k, len(wrong), 1 / 3)
    # relation scenes: shapes stay; colours swapped and relation flipped independently
    assert all(d.kind == "relation" and [o[1] for o in d.objects] == [o[1] for o in s.objects] for s, d in rels)
    flipped = [d.relation != s.relation for s, d in rels]
    assert _within(sum(flipped), len(rels), RATE)
    distinct = [(s, d, f) for (s, d), f in zip(rels, flipped) if s.objects[0][0] != s.objects[1][0]]
    swapped = [d.objects == ((s.objects[1][0], s.objects[0][1]), (s.objects[0][0], s.objects[1][1]))
               for s, d, _ in distinct]
    assert all(sw or d.objects == s.objects for sw, (s, d, _) in zip(swapped, distinct))
    assert _within(sum(swapped), len(distinct), RATE)
    assert _within(sum(sw and f for sw, (_, _, f) in zip(swapped, distinct)), len(distinct), RATE * RATE)
    # equal colours: a swap changes nothing
    assert all(d.objects == s.objects for s, d in rels if s.objects[0][0] == s.objects[1][0])


def test_zero_rates_are_the_identity_and_one_always_degrades():
    rng = np.random.default_rng(0)
    for s in world.all_specs():
        assert world.degrade(s, rng) is s
        assert world.degrade(s, rng, 0.0, 0.0, 0.0, split="train") is s
        d = world.degrade(s, rng, 1.0, 0.0, 1.0)
        assert d != s and d.kind == s.kind
    with pytest.raises(ValueError, match="p_binding"):
        world.degrade(world.all_specs()[0], rng, p_binding=1.5)


def test_degrade_within_split_never_names_heldout_combinations():
    rng = np.random.default_rng(1)
    train = world.split_specs("train")
    out = [world.degrade(s, rng, 1.0, 1.0, 1.0, split="train") for s in train for _ in range(3)]
    assert not set(out) & world.HELDOUT
    # still degrades every count scene (each object keeps another number in the train split)
    assert all(d != s for s, d in zip([s for s in train for _ in range(3)], out) if s.kind == "count")


def test_degrade_is_deterministic_in_the_rng_seed():
    specs = world.sample_specs(5, 500, "all")

    def run(seed):
        rng = np.random.default_rng(seed)
        return [world.degrade(s, rng, 0.5, 0.5, 0.5) for s in specs]

    assert run(3) == run(3)
    assert run(3) != run(4)
    # the rng stream does not depend on the rates (one draw pattern per spec)
    a, b = np.random.default_rng(9), np.random.default_rng(9)
    for s in specs:
        world.degrade(s, a, 0.0, 0.0, 0.0)
        world.degrade(s, b, 1.0, 1.0, 1.0)
    assert a.random() == b.random()


def test_evaluation_and_token_batches_are_never_degraded(monkeypatch):
    before = (world.sample_specs(10_000, 64, "train"), world.make_batch(0, 3, 8))

    def forbidden(*a, **k):
        raise AssertionError("degrade called outside pretraining")

    monkeypatch.setattr(world, "degrade", forbidden)
    after = (world.sample_specs(10_000, 64, "train"), world.make_batch(0, 3, 8))
    assert before[0] == after[0] and before[1][1] == after[1][1] and np.array_equal(before[1][0], after[1][0])
    data = batches.NearMissData(lambda caps: torch.zeros(len(caps), 16, P.TEXT_WIDTH), seed=0)
    for step in range(20):
        data.batch(step)
    from training.demo import diagnostic

    for s in world.sample_specs(1, 50, "train"):
        for c in diagnostic.CATEGORIES:
            diagnostic.near_miss_group(s, c)


class _Recorder:
    """Wraps the tokenizer built by ``pretrain.build`` and records every caption batch."""

    def __init__(self, tok, log):
        self.tok, self.log = tok, log

    def __call__(self, caps):
        self.log.append(list(caps))
        return self.tok(caps)

    def __getattr__(self, name):
        return getattr(self.tok, name)


def _record(monkeypatch):
    log, build = [], P.build

    def wrapped(*a, **k):
        unet, text, tok = build(*a, **k)
        return unet, text, _Recorder(tok, log)

    monkeypatch.setattr(P, "build", wrapped)
    return log


def test_pretraining_degrades_captions_only(tmp_path, monkeypatch):
    torch.set_num_threads(1)
    log = _record(monkeypatch)
    P.train(tmp_path / "a", steps=2, batch=8, progress=False, p_count=1.0, p_uncond=0.0, degrade_count=1.0)
    for step, caps in enumerate(log):
        _, specs = world.make_batch(0, step, 8, p_count=1.0)  # the rendered images' specs
        got = [world.parse_caption(c) for c in caps]
        assert all(g.objects == s.objects and g.count != s.count for g, s in zip(got, specs))
    log.clear()
    P.train(tmp_path / "b", steps=1, batch=8, progress=False, p_uncond=1.0, degrade_binding=1.0,
            degrade_position=1.0, degrade_count=1.0)
    assert log == [[""] * 8]  # dropped captions stay empty
    with pytest.raises(ValueError, match="degrade_count"):
        P.train(tmp_path / "c", steps=1, batch=4, progress=False, degrade_count=2.0)


def test_zero_rates_turn_degradation_off(tmp_path):
    # the shipped recipe degrades captions; rates 0 turn that off (and only that)
    torch.set_num_threads(1)
    off = dict(degrade_count=0.0, degrade_binding=0.0, degrade_position=0.0)
    P.train(tmp_path / "a", steps=2, batch=4, progress=False, **off)
    P.train(tmp_path / "b", steps=2, batch=4, progress=False)
    a = torch.load(tmp_path / "a" / "ckpt.pt", weights_only=True)
    b = torch.load(tmp_path / "b" / "ckpt.pt", weights_only=True)
    assert a["unet_config"] == P.UNET_CONFIG and a["text_config"] == P.TEXT_CONFIG
    assert {k: a["cfg"][k] for k in P.RECIPE} == {**P.RECIPE, **off, "steps": 2, "batch": 4}
    assert {k: b["cfg"][k] for k in P.RECIPE} == {**P.RECIPE, "steps": 2, "batch": 4}
    assert P.DEGRADE_DEFAULTS["degrade_binding"] > 0 and P.DEGRADE_DEFAULTS["degrade_position"] > 0
    assert not all(torch.equal(x, y) for x, y in zip(a["ema"], b["ema"]))  # the recipe's wrong captions matter


def test_degraded_resume_matches_uninterrupted_run(tmp_path):
    torch.set_num_threads(1)
    opts = dict(batch=4, progress=False, degrade_count=0.5, degrade_binding=0.5, degrade_position=0.5)
    P.train(tmp_path / "a", steps=4, **opts)
    P.train(tmp_path / "b", steps=2, **opts)
    P.train(tmp_path / "b", steps=4, resume=True, progress=False)  # settings come from the checkpoint
    a = torch.load(tmp_path / "a" / "ckpt.pt", weights_only=True)
    b = torch.load(tmp_path / "b" / "ckpt.pt", weights_only=True)
    assert a["step"] == b["step"] == 4 and b["cfg"]["degrade_binding"] == 0.5
    assert all(torch.equal(x, y) for x, y in zip(a["ema"], b["ema"]))


def test_architecture_overrides(tmp_path):
    torch.set_num_threads(1)
    P.train(tmp_path / "a", steps=1, batch=4, progress=False, unet_config={"attention_head_dim": 16},
            text_config={"layers": 3})
    ck = torch.load(tmp_path / "a" / "ckpt.pt", weights_only=True)
    assert ck["unet_config"]["attention_head_dim"] == 16 and ck["text_config"]["layers"] == 3
    assert P.UNET_CONFIG["attention_head_dim"] == 4 and P.TEXT_CONFIG["layers"] == 2  # defaults untouched
    out = P.export(tmp_path / "a" / "ckpt.pt", tmp_path / "a" / "tiny_t2i")
    unet, encode = P.load_tiny_t2i(path=out)
    assert unet.config.attention_head_dim == 16 and encode(["two red circles"]).shape == (1, 16, P.TEXT_WIDTH)
    # a resumed run keeps its architecture; a conflicting override is an error
    P.train(tmp_path / "a", steps=2, resume=True, progress=False)
    assert torch.load(tmp_path / "a" / "ckpt.pt", weights_only=True)["text_config"]["layers"] == 3
    with pytest.raises(ValueError, match="attention_head_dim"):
        P.train(tmp_path / "a", steps=3, resume=True, progress=False, unet_config={"attention_head_dim": 4})
    with pytest.raises(ValueError, match="unknown unet_config"):
        P.train(tmp_path / "b", steps=1, progress=False, unet_config={"heads": 3})
