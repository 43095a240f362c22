"""Step-selected refinement in the demo: subjects, the sampler hook, soft tokens, the refine-sweep CLI."""

import json

import pytest
import torch

from training.demo import pretrain, refinement, world
from training.demo.textenc import WordTokenizer
from training.refine import AttentionCapture, RefineSettings

needs_model = pytest.mark.skipif(not (pretrain.ASSET_DIR / "config.json").exists(), reason="tiny_t2i asset not shipped")
PROMPTS = ["two red circles", "a blue square left of a yellow triangle", "a red circle left of a blue circle",
           "three green triangles"]


@pytest.fixture(scope="module")
def model():
    torch.set_num_threads(1)
    return pretrain.load_tiny_t2i()


def _calls(unet):
    """A counter of the UNet's forward calls (and the hook handle)."""
    n = [0]
    handle = unet.register_forward_pre_hook(lambda *a: n.__setitem__(0, n[0] + 1))
    return n, handle


# --- subjects and positions ----------------------------------------------------------------------

def test_subjects_and_positions_of_world_captions():
    tok = WordTokenizer(world.vocabulary(), 16)
    assert refinement.subjects(world.parse_caption("two red circles")) == ["circles"]
    assert refinement.subjects("one green square") == ["square"]
    assert refinement.subjects("a blue square left of a yellow triangle") == ["square", "triangle"]
    # position 0 is BOS, then one token per word
    assert refinement.positions(tok, "two red circles") == ((3,),)
    assert refinement.positions(tok, "one green square") == ((3,),)
    assert refinement.positions(tok, "a blue square left of a yellow triangle") == ((3,), (8,))
    assert refinement.positions(tok, "a red circle right of a blue circle") == ((3,), (8,))  # repeated word: in order
    assert refinement.pieces(tok, "two red circles")[:5] == ["<bos>", "two", "red", "circles", "<eos>"]
    for spec in world.sample_specs(5, 40, "all"):  # every caption of the world has its subjects
        pos = refinement.positions(tok, spec.caption)
        assert len(pos) == (1 if spec.kind == "count" else 2) and len(set(pos)) == len(pos)
    st = refinement.streams(tok, ["two red circles"])[0][0]
    assert st.columns == (0, 16) and st.window == (1, 15) and st.subjects == ((3,),)
    with pytest.raises(ValueError, match="'dog' not found"):
        refinement.positions(tok, "two red circles", ["dog"])
    with pytest.raises(ValueError, match="not found"):
        refinement.positions(tok, "two red circles", ["circle"])  # words as written: "circles"


def test_parse_steps():
    assert refinement.parse_steps(None, 12) == list(range(12))
    assert refinement.parse_steps("4,1-2,4", 12) == [1, 2, 4]
    with pytest.raises(ValueError, match="outside the 12-step schedule"):
        refinement.parse_steps("3,12", 12)
    with pytest.raises(ValueError, match="step indices like"):
        refinement.parse_steps("a", 12)


# --- the sampler hook ----------------------------------------------------------------------------

@needs_model
def test_zero_iterations_is_bit_identical_to_plain_sampling(model):
    unet, encode = model
    plain = pretrain.sample(unet, encode, PROMPTS, seed=3, steps=4)
    r = refinement.Refiner(unet, encode.tokenizer, step=1, settings=RefineSettings(iterations=0))
    assert torch.equal(pretrain.sample(unet, encode, PROMPTS, seed=3, steps=4, refine=r), plain)
    r = refinement.Refiner(unet, encode.tokenizer, step=1, settings=RefineSettings(iterations=2, scale=200.0))
    assert not torch.equal(pretrain.sample(unet, encode, PROMPTS, seed=3, steps=4, refine=r), plain)


@needs_model
def test_one_pass_gives_the_refined_and_the_unrefined_images(model):
    """unrefined=True: the same images as two separate runs, the shared early steps run once."""
    unet, encode = model
    settings = RefineSettings(iterations=2, scale=200.0)
    plain = pretrain.sample(unet, encode, PROMPTS, seed=3, steps=4, batch=2)
    refined = pretrain.sample(unet, encode, PROMPTS, seed=3, steps=4, batch=2,
                              refine=refinement.Refiner(unet, encode.tokenizer, step=2, settings=settings))
    both = pretrain.sample(unet, encode, PROMPTS, seed=3, steps=4, batch=2, unrefined=True,
                           refine=refinement.Refiner(unet, encode.tokenizer, step=2, settings=settings))
    assert torch.equal(both[0], refined) and torch.equal(both[1], plain) and not torch.equal(refined, plain)
    with pytest.raises(ValueError, match="refine hook"):
        pretrain.sample(unet, encode, PROMPTS, steps=4, unrefined=True)


def test_cn_loss_falls_over_the_iterations(model):
    unet, encode = model
    r = refinement.Refiner(unet, encode.tokenizer, step=2,
                           settings=RefineSettings(iterations=6, loss="cn", scale=200.0))
    pretrain.sample(unet, encode, PROMPTS, seed=0, steps=6, refine=r)
    (hist,) = r.history  # one batch
    assert len(hist) == 6
    cn = [sum(h["cn"]) / len(h["cn"]) for h in hist]
    assert cn[-1] < cn[0] - 0.005 and cn[1] < cn[0] and cn[2] < cn[1], cn  # falls (a fixed step may wobble late)
    assert hist[0]["loss"] == hist[0]["cn"]
    assert r.alpha() == pytest.approx(200.0 * (1 - 0.5 * 2 / 5) ** 0.5)


@needs_model
def test_refinement_with_soft_tokens_drops_their_columns(model, monkeypatch):
    from training.diffusers_hooks import TokenInjector
    from training.layouts import TokenLayout
    from training.tokens import SoftTokens

    unet, encode = model
    lay = TokenLayout(arch="sd15", method="softrepa", n_tokens=4, width=128, text_width=128,
                      blocks=("down", "mid"), time_buckets=0)
    tokens = SoftTokens(lay, static=torch.randn(lay.static_shape) * 0.5)
    seen = {"raw": set(), "maps": []}

    class Recording(AttentionCapture):
        def _text_columns(self, probs):
            seen["raw"].add(probs.shape[-1])
            return super()._text_columns(probs)

        def maps(self):
            A = super().maps()
            seen["maps"].append(tuple(A.shape))
            return A

    monkeypatch.setattr(refinement, "AttentionCapture", Recording)
    inj = TokenInjector(unet, tokens)
    try:
        r = refinement.Refiner(unet, encode.tokenizer, step=1, settings=RefineSettings(iterations=2, scale=200.0),
                               token_layout=lay)
        with inj.using(tokens):
            out = pretrain.sample(unet, encode, PROMPTS, seed=0, steps=4, refine=r)
        assert torch.isfinite(out).all() and len(r.history[0]) == 2
        # down block 1 sees 16 + 4 keys (tokens), up block 1 the plain 16; the maps keep the prompt's 16
        assert seen["raw"] == {20, 16} and seen["maps"] == [(4, 8, 8, 16)] * 2
        no_layout = refinement.Refiner(unet, encode.tokenizer, step=1, settings=RefineSettings(iterations=1))
        with inj.using(tokens), pytest.raises(ValueError, match="token_layout"):
            pretrain.sample(unet, encode, PROMPTS[:1], seed=0, steps=4, refine=no_layout)
    finally:
        inj.remove()


@needs_model
def test_bad_input_raises_before_sampling(model):
    unet, encode = model
    n, handle = _calls(unet)
    try:
        with pytest.raises(ValueError, match="outside the 4-step schedule"):
            pretrain.sample(unet, encode, PROMPTS, steps=4, refine=refinement.Refiner(unet, encode.tokenizer, step=4))
        with pytest.raises(ValueError, match="'dog' not found"):
            pretrain.sample(unet, encode, PROMPTS, steps=4,
                            refine=refinement.Refiner(unet, encode.tokenizer, step=1, words=["dog"]))
        with pytest.raises(ValueError, match="step index"):
            refinement.Refiner(unet, encode.tokenizer, step=-1)
    finally:
        handle.remove()
    assert n[0] == 0


# --- the refine-sweep command --------------------------------------------------------------------

@needs_model
def test_refine_sweep_cli_end_to_end(tmp_path, capsys):
    from training.cli import main

    out = tmp_path / "sweep"
    rc = main(["refine-sweep", "--steps", "1,3", "--seeds", "1", "--n", "6", "--sample-steps", "4",
               "--iterations", "2", "--threads", "1", "--out", str(out), "--no-progress"])
    assert rc == 0
    for name in ("sweep.md", "sweep.json", "sweep.png"):
        assert (out / name).stat().st_size > 0, name
    res = json.loads((out / "sweep.json").read_text())
    assert res["steps"] == [1, 3] and res["best_step"] in (1, 3) and res["n"] == 6
    assert set(res["per_seed"]) == {"baseline", "1", "3"} and len(res["per_seed"]["1"]) == 1
    assert 0 <= res["mean_std"]["baseline"]["overall"][0] <= 1
    assert res["settings"]["iterations"] == 2 and res["timesteps"] == {"1": 749, "3": 249}
    table = (out / "sweep.md").read_text()
    assert "| no refinement |" in table and "**best**" in table
    assert "best step" in capsys.readouterr().out


def test_refine_sweep_cli_rejects_bad_input_fast(tmp_path, capsys):
    from training.cli import main

    assert main(["refine-sweep", "--steps", "12", "--out", str(tmp_path / "x")]) == 2
    assert "outside the 12-step schedule" in capsys.readouterr().err
    assert main(["refine-sweep", "--iterations", "-1", "--out", str(tmp_path / "x")]) == 2
    assert main(["refine-sweep", "--seeds", "0", "--out", str(tmp_path / "x")]) == 2
    assert not (tmp_path / "x").exists()
