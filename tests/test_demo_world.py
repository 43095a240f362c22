"""The embedded demo world: generator, GenEval-mini, tokenizer, sampler, pretraining, shipped model."""

import json

import numpy as np
import pytest
import torch

from training.cli import main as cli_main
from training.demo import geneval_mini as G
from training.demo import pretrain as P
from training.demo import world
from training.demo.textenc import BOS, EOS, PAD, WordTokenizer


# --- generator ----------------------------------------------------------------------------------

def test_generator_is_deterministic():
    a, sa = world.make_batch(3, 17, 8)
    b, sb = world.make_batch(3, 17, 8)
    c, _ = world.make_batch(3, 18, 8)
    assert a.dtype == np.uint8 and a.shape == (8, 32, 32, 3)
    assert np.array_equal(a, b) and sa == sb
    assert not np.array_equal(a, c)
    spec = world.parse_caption("two red circles")
    assert np.array_equal(world.render(spec, 5)[0], world.render(spec, 5)[0])
    # the pretraining stream's scene mix
    assert {s.kind for s in world.make_batch(0, 0, 32, p_count=0.0)[1]} == {"relation"}
    assert {s.kind for s in world.make_batch(0, 0, 32, p_count=1.0)[1]} == {"count"}
    with pytest.raises(ValueError, match="p_count"):
        world.make_batch(0, 0, 4, p_count=30)


def test_captions_round_trip_and_grammar():
    for spec in world.all_specs():
        assert world.parse_caption(spec.caption) == spec
    assert world.parse_caption("a green triangle to the right of a red square") == world.Spec(
        "relation", (("green", "triangle"), ("red", "square")), relation="right of")
    assert world.parse_caption("one blue square").count == 1
    with pytest.raises(ValueError, match="grammar"):
        world.parse_caption("a purple dog")
    with pytest.raises(ValueError):
        world.Spec("count", (("red", "circle"),), 5)


def test_splits_hold_out_combinations_but_no_words():
    train, held = world.split_specs("train"), world.split_specs("heldout")
    assert not set(train) & set(held)
    assert len(train) + len(held) == len(world.all_specs()) == 48 + 264
    assert {s.kind for s in held} == {"count", "relation"}
    train_words = {w for s in train for w in s.caption.split()}
    held_words = {w for s in held for w in s.caption.split()}
    assert held_words <= train_words
    assert all(s in held for s in world.sample_specs(0, 50, "heldout"))


def test_layout_respects_relation_and_bounds():
    for i, spec in enumerate(world.split_specs("all")[::7]):
        objs = world.layout_objects(spec, np.random.default_rng(i))
        assert len(objs) == len(spec.expected())
        for _, _, cx, cy, side in objs:
            assert 1 <= cx - side / 2 and cx + side / 2 <= world.SIZE - 1
            assert 1 <= cy - side / 2 and cy + side / 2 <= world.SIZE - 1
        if spec.kind == "relation":
            xa, xb = objs[0][2], objs[1][2]
            assert (xa < xb) == (spec.relation == "left of")


# --- evaluator ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def renders():
    specs = world.all_specs()
    return np.stack([world.render(s, [11, i])[0] for i, s in enumerate(specs)]), specs


def test_geneval_mini_on_clean_ground_truth(renders):
    imgs, specs = renders
    acc = G.evaluate(imgs, specs)
    assert set(acc) == set(G.CATEGORIES)
    assert min(acc.values()) >= 0.98, acc


def test_geneval_mini_on_noisy_tinted_renders(renders):
    imgs, specs = renders
    noisy = G.perturb(imgs, seed=2, noise=0.08, tint=0.3)
    assert np.abs(noisy.astype(int) - imgs).mean() > 10  # the perturbation is real
    acc = G.evaluate(noisy, specs)
    assert min(acc.values()) >= 0.95, acc


def test_geneval_mini_rejects_wrong_images(renders):
    imgs, specs = renders
    idx = [i for i, s in enumerate(specs) if s.kind == "relation"][:40]
    flipped = [world.Spec("relation", s.objects, relation="right of" if s.relation == "left of" else "left of")
               for s in (specs[i] for i in idx)]
    acc = G.evaluate(imgs[idx], flipped)
    assert acc["binding"] >= 0.98 and acc["position"] <= 0.02
    swapped = [world.Spec("relation", ((a[0], b[1]), (b[0], a[1])), relation=s.relation)
               for s in (specs[i] for i in idx) for a, b in [s.objects] if a[0] != b[0] and a[1] != b[1]]
    keep = [i for i in idx if specs[i].objects[0][0] != specs[i].objects[1][0]
            and specs[i].objects[0][1] != specs[i].objects[1][1]]
    acc = G.evaluate(imgs[keep], swapped)
    assert acc["colour"] >= 0.98 and acc["shape"] >= 0.98 and acc["binding"] <= 0.02
    counts = [i for i, s in enumerate(specs) if s.kind == "count" and s.count == 2]
    acc = G.evaluate(imgs[counts], [world.Spec("count", specs[i].objects, 3) for i in counts])
    assert acc["count"] <= 0.02
    blank = np.zeros((1, 32, 32, 3), np.uint8)
    acc = G.evaluate(blank, ["one red circle"])
    assert acc["colour"] == 0.0 and acc["overall"] == 0.0
    assert "count" not in acc  # single-object prompts are not counting prompts (as in GenEval)
    pair = [i for i, s in enumerate(specs) if s.kind == "count" and s.count == 2][:1]
    acc = G.evaluate(imgs[pair], [world.Spec("count", specs[pair[0]].objects, 1)])
    assert acc["overall"] == 0.0 and "count" not in acc  # two objects for "one": overall fails


def test_count_misses_tells_too_few_from_too_many(renders):
    imgs, specs = renders
    idx = [i for i, s in enumerate(specs) if s.kind == "count" and s.count == 3]
    found = G.evaluate(imgs[idx], [specs[i] for i in idx], details=True)[2]
    assert G.count_misses(found, [specs[i] for i in idx]) == {"fewer": 0.0, "more": 0.0}
    as_two = [world.Spec("count", specs[i].objects, 2) for i in idx]
    as_four = [world.Spec("count", specs[i].objects, 4) for i in idx]
    assert G.count_misses(found + found, as_two + as_four) == {"fewer": 0.5, "more": 0.5}
    one = [world.Spec("count", specs[i].objects, 1) for i in idx]  # single-object prompts are not counted
    assert np.isnan(G.count_misses(found, one)["fewer"])
    # two copies drawn touching are one object for the evaluator: "too few"
    merged = world.render_objects([("red", "square", 10.0, 16.0, 10.0), ("red", "square", 19.0, 16.0, 10.0)])
    spec = world.Spec("count", (("red", "square"),), 2)
    assert G.count_misses(G.evaluate(merged[None], [spec], details=True)[2], [spec]) == {"fewer": 1.0, "more": 0.0}


def test_geneval_mini_accepts_model_tensors(renders):
    imgs, specs = renders
    x = P.to_model_images(imgs[:10])
    assert G.evaluate(x, specs[:10]) == G.evaluate(imgs[:10], specs[:10])
    with pytest.raises(ValueError, match="specs"):
        G.evaluate(imgs[:3], specs[:2])


# --- tokenizer, sampler, pretraining ------------------------------------------------------------

def test_tokenizer_layout():
    tok = WordTokenizer(world.vocabulary())
    ids = tok(["", "a blue square left of a yellow triangle"])
    assert ids.shape == (2, 16)
    assert ids[0, :3].tolist() == [BOS, EOS, PAD] and (ids[0, 2:] == PAD).all()
    assert ids[1, 0] == BOS and ids[1, 9] == EOS and (ids[1, 10:] == PAD).all()
    with pytest.raises(ValueError, match="unknown word"):
        tok(["a purple circle"])


def test_ddim_sampler_is_exact_with_an_oracle():
    """With the true epsilon of a fixed x0, DDIM (any step count) lands exactly on x0."""
    abar = P.alphas_cumprod().float()
    x0 = torch.rand(2, 12, 16, 16) * 1.8 - 0.9

    class Oracle(torch.nn.Module):
        def __init__(self):
            super().__init__()
            self.w = torch.nn.Parameter(torch.zeros(1))
            self.config = type("C", (), {"sample_size": 16, "in_channels": 12})

        def forward(self, x, t, encoder_hidden_states=None):
            a = abar[t].view(-1, 1, 1, 1)
            return type("Out", (), {"sample": (x - a.sqrt() * torch.cat([x0, x0])) / (1 - a).sqrt()})

    for steps in (1, 7, 25):
        out = P.sample(Oracle(), lambda p: torch.zeros(len(p), 16, 8), ["x", "y"], seed=0, steps=steps, cfg=4.0)
        assert (P.images_to_latents(out) - x0).abs().max() < 1e-5
    assert P.ddim_timesteps(4) == [999, 749, 499, 249]


def test_pretrain_resume_matches_uninterrupted_run(tmp_path):
    args = ["demo", "--pretrain", "--steps", "4", "--finetune-steps", "2", "--batch", "4", "--threads", "1"]
    assert cli_main(args + ["--out", str(tmp_path / "a")]) == 0
    # b stops inside the first phase, c inside the second (its warmup is longer than 2 steps, so
    # a 1-step second phase takes the same first step as a 2-step one)
    assert P.train(tmp_path / "b", steps=2, batch=4, progress=False)["step"] == 2
    with pytest.raises(ValueError, match="--resume"):
        P.train(tmp_path / "b", steps=4, batch=4, progress=False)
    assert cli_main(args + ["--out", str(tmp_path / "b"), "--resume"]) == 0
    assert P.pretrain_phases(tmp_path / "c", steps=4, finetune_steps=1, batch=4, progress=False)["step"] == 1
    assert cli_main(args + ["--out", str(tmp_path / "c"), "--resume"]) == 0
    for phase, steps in (("ckpt.pt", 4), ("phase2/ckpt.pt", 2)):
        a = torch.load(tmp_path / "a" / phase, weights_only=True)
        for other in ("b", "c"):
            b = torch.load(tmp_path / other / phase, weights_only=True)
            assert a["step"] == b["step"] == steps
            for x, y in zip(a["ema"], b["ema"]):
                assert torch.equal(x, y)
    unet, encode = P.load_tiny_t2i(path=tmp_path / "a" / "tiny_t2i")
    assert encode(["two red circles"]).shape == (1, 16, P.TEXT_WIDTH)
    meta = json.loads((tmp_path / "a" / "tiny_t2i" / "config.json").read_text())
    assert meta["train"]["init_train"]["step"] == 4 and meta["train"]["seed"] == P.FINETUNE["seed"]


def test_a_later_phase_starts_from_exported_weights_and_resumes_exactly(tmp_path):
    P.train(tmp_path / "p1", steps=2, batch=4, progress=False)
    first = P.export(tmp_path / "p1" / "ckpt.pt", tmp_path / "p1" / "tiny_t2i")
    with pytest.raises(ValueError, match="architecture"):
        P.train(tmp_path / "x", steps=2, batch=4, progress=False, init=first, text_config={"layers": 3})
    with pytest.raises(ValueError, match="no tiny text-to-image model"):
        P.train(tmp_path / "x", steps=2, batch=4, progress=False, init=tmp_path / "p1")
    # step 0 of the new phase, before any update: its weights are the exported ones
    P.train(tmp_path / "p2", steps=0, batch=4, progress=False, init=first, seed=5)
    ck = torch.load(tmp_path / "p2" / "ckpt.pt", weights_only=True)
    unet, _ = P.load_tiny_t2i(path=first)
    assert ck["step"] == 0 and ck["cfg"]["init"] == str(first)
    for name, p in unet.named_parameters():
        assert torch.equal(ck["unet"][name], p)
    P.train(tmp_path / "p2", steps=2, batch=4, progress=False, resume=True)
    P.train(tmp_path / "p3", steps=2, batch=4, progress=False, init=first, seed=5)
    a = torch.load(tmp_path / "p2" / "ckpt.pt", weights_only=True)
    b = torch.load(tmp_path / "p3" / "ckpt.pt", weights_only=True)
    assert a["step"] == b["step"] == 2
    for x, y in zip(a["ema"], b["ema"]):
        assert torch.equal(x, y)
    meta = json.loads((P.export(tmp_path / "p3" / "ckpt.pt", tmp_path / "p3" / "tiny_t2i") / "config.json").read_text())
    assert meta["train"]["seed"] == 5 and meta["train"]["init_train"]["seed"] == 0  # both phases recorded


# --- the shipped model --------------------------------------------------------------------------

@pytest.fixture(scope="module")
def shipped():
    if not (P.ASSET_DIR / "config.json").exists():
        pytest.skip(f"no shipped tiny model in {P.ASSET_DIR}")
    return P.load_tiny_t2i()


def test_shipped_model_loads_and_samples(shipped):
    unet, encode = shipped
    size = sum(f.stat().st_size for f in P.ASSET_DIR.iterdir())
    assert size <= 20 * 2 ** 20
    assert not any(p.requires_grad for p in unet.parameters())
    ctx = encode(["two red circles", ""])
    assert ctx.shape == (2, 16, P.TEXT_WIDTH) and not ctx.requires_grad
    a = P.sample(unet, encode, ["two red circles", "a blue square left of a yellow triangle"], seed=1, steps=6)
    b = P.sample(unet, encode, ["two red circles", "a blue square left of a yellow triangle"], seed=1, steps=6)
    assert a.shape == (2, 3, 32, 32) and torch.equal(a, b)
    assert a.min() >= -1 and a.max() <= 1


def test_shipped_model_was_trained_with_the_default_recipe(shipped):
    # `python -m training demo --pretrain` (RECIPE, then FINETUNE) must reproduce what is shipped
    import json

    meta = json.loads((P.ASSET_DIR / "config.json").read_text())
    train = meta["train"]
    assert {k: train[k] for k in P.RECIPE} == {**P.RECIPE, **P.FINETUNE}  # the second phase
    assert train["step"] == P.FINETUNE["steps"]
    first = train["init_train"]
    assert {k: first[k] for k in P.RECIPE} == P.RECIPE and first["step"] == P.RECIPE["steps"]
    assert meta["unet_config"] == json.loads(json.dumps(P.UNET_CONFIG))
    assert meta["text_config"] == P.TEXT_CONFIG and tuple(meta["betas"]) == P.BETAS


def test_shipped_model_samples_through_token_injector(shipped):
    from training.diffusers_hooks import TokenInjector
    from training.layouts import TokenLayout
    from training.tokens import SoftTokens

    unet, encode = shipped
    lay = TokenLayout(arch="sd15", method="softrepa", n_tokens=2, width=P.TEXT_WIDTH,
                      text_width=P.TEXT_WIDTH, blocks=("down", "mid"))
    tok = SoftTokens(lay, generator=torch.Generator().manual_seed(0))
    tok.static.data.mul_(100)
    prompts = ["one green square"]
    base = P.sample(unet, encode, prompts, seed=0, steps=4)
    inj = TokenInjector(unet, tok)
    try:
        on = P.sample(unet, encode, prompts, seed=0, steps=4)
        with inj.using(None):
            off = P.sample(unet, encode, prompts, seed=0, steps=4)
        ctx_off = P.sample(unet, encode, prompts, seed=0, steps=4, tokens_injector=inj.using(None))
    finally:
        inj.remove()
    assert torch.equal(off, base) and torch.equal(ctx_off, base)
    assert (on - base).abs().max() > 1e-2
