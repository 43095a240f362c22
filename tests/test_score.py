"""The alignment score, and SoftREPA training raising it on a tiny model."""

import math

import pytest
import torch

from training.cli import main as cli_main
from training.diffusers_backend import DiffusersBackend
from training.layouts import TokenLayout
from training.pairs import pair_errors
from training.score import alignment_score, format_score
from training.tokens import SoftTokens
from training.trainer import TensorData, TrainConfig, Trainer

W = 32


class LookupBackend:
    """A fake backend with known errors: z_t = target = x0, prediction = the prompt's vector.

    The plain model predicts ``cond["context"]``; with tokens and t >= 500 it predicts
    ``cond["fixed"]`` instead, so the tokens' effect on the classifier is known exactly.
    """

    prediction = "epsilon"

    def noisy(self, x0, noise, t):
        return x0

    def target(self, x0, noise, t):
        return x0

    def predict(self, z_t, t, cond, tokens, set_index=0):
        key = "fixed" if tokens is not None and int(t[0]) >= 500 else "context"
        return cond[key].reshape(z_t.shape)


def test_score_counts_top1_matches_per_group_and_t():
    g = torch.Generator().manual_seed(0)
    x0 = torch.randn(9, 4, 2, 2, generator=g)
    # Group 0 (pairs 0-3): every prompt predicts its own image. Group 1 (4-7): prompts 4 and 5
    # predict each other's image, so images 4 and 5 are misclassified. Pair 8 is a leftover.
    swapped = x0[[0, 1, 2, 3, 5, 4, 6, 7, 8]]
    cond = {"context": swapped.flatten(1), "fixed": x0.flatten(1)}
    tok = SoftTokens(TokenLayout(arch="sd15", method="softrepa", n_tokens=1, width=8, text_width=8, blocks=("down",)))
    s = alignment_score(LookupBackend(), tok, x0, cond, group=4, ts=(100, 900), seed=1)
    assert (s["pairs"], s["groups"], s["chance"]) == (8, 2, 0.25)
    assert s["accuracy_base"] == 6 / 8
    assert s["accuracy"] == (6 / 8 + 8 / 8) / 2  # tokens fix the swap at t=900 only
    assert s["per_t"] == {100: {"accuracy": 0.75, "accuracy_base": 0.75}, 900: {"accuracy": 1.0, "accuracy_base": 0.75}}
    swap_err = (x0[4] - x0[5]).square().mean().item()
    assert s["error_base"] == pytest.approx(2 * swap_err / 8, rel=1e-6)
    assert s["error"] == pytest.approx(swap_err / 8, rel=1e-6)
    assert "with tokens" in format_score(s)
    only_base = alignment_score(LookupBackend(), None, x0, cond, group=4, ts=(100,))
    assert "accuracy" not in only_base and only_base["accuracy_base"] == 0.75


def test_score_matches_pair_errors_with_its_fixed_noise():
    from tiny_models import tiny_unet

    backend = DiffusersBackend(tiny_unet(W))
    g = torch.Generator().manual_seed(3)
    x0, cond = torch.randn(3, 4, 8, 8, generator=g), {"context": torch.randn(3, 5, W, generator=g)}
    torch.manual_seed(123)  # the global RNG plays no part
    s = alignment_score(backend, None, x0, cond, group=3, ts=(400,), seed=7)
    torch.manual_seed(456)
    assert alignment_score(backend, None, x0, cond, group=3, ts=(400,), seed=7) == s
    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(7))
    E = pair_errors(backend, x0, cond, 400, noise, None)
    assert s["accuracy_base"] == (E.argmin(1) == torch.arange(3)).float().mean().item()
    assert s["error_base"] == pytest.approx(E.diagonal().mean().item(), rel=1e-6)


def test_packed_groups_give_each_groups_own_pair_errors():
    from tiny_models import tiny_unet

    from training.pairs import group_pair_errors

    backend = DiffusersBackend(tiny_unet(W))
    g = torch.Generator().manual_seed(4)
    x0, cond = torch.randn(9, 4, 8, 8, generator=g), {"context": torch.randn(9, 5, W, generator=g)}
    noise = torch.randn(3, 4, 8, 8, generator=g)
    E = group_pair_errors(backend, x0, cond, 300, noise, None, group=3)
    assert E.shape == (3, 3, 3)
    for q in range(3):
        rows = slice(3 * q, 3 * q + 3)
        alone = pair_errors(backend, x0[rows], {"context": cond["context"][rows]}, 300, noise[q:q + 1], None)
        torch.testing.assert_close(E[q], alone, rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(group_pair_errors(backend, x0, cond, 300, noise, None, group=3, chunk=4), E,
                               rtol=1e-5, atol=1e-7)
    with pytest.raises(ValueError, match="one noise per group"):
        group_pair_errors(backend, x0, cond, 300, noise[:2], None, group=3)


def test_score_does_not_depend_on_groups_per_call():
    """chunk packs whole groups into one call (or splits one): the same pairs, noise and result."""
    from tiny_models import tiny_unet

    backend = DiffusersBackend(tiny_unet(W))
    g = torch.Generator().manual_seed(5)
    x0, cond = torch.randn(13, 4, 8, 8, generator=g), {"context": torch.randn(13, 5, W, generator=g)}
    ref = alignment_score(backend, None, x0, cond, group=3, ts=(200, 700), seed=2)
    for chunk in (4, 9, 27, 1000):  # part of a group, one group, 3 groups, all 4 groups (+ leftover pair)
        s = alignment_score(backend, None, x0, cond, group=3, ts=(200, 700), seed=2, chunk=chunk)
        assert s["accuracy_base"] == ref["accuracy_base"] and s["per_t"] == ref["per_t"], chunk
        assert s["error_base"] == pytest.approx(ref["error_base"], rel=1e-5)


def test_score_rejects_bad_input():
    x0, cond = torch.zeros(3, 4, 2, 2), {"context": torch.zeros(3, 16)}
    with pytest.raises(ValueError, match="at least 4"):
        alignment_score(LookupBackend(), None, x0, cond, group=4)
    with pytest.raises(ValueError, match="one caption per image"):
        alignment_score(LookupBackend(), None, x0, {"context": torch.zeros(2, 16)}, group=2)
    with pytest.raises(ValueError, match="0..999"):
        alignment_score(LookupBackend(), None, x0, cond, group=2, ts=(1000,))


def test_cli_score_rejects_missing_inputs(tmp_path, capsys):
    assert cli_main(["score", "--model", str(tmp_path / "none"), "--data", str(tmp_path)]) == 2
    assert "model folder" in capsys.readouterr().err
    assert cli_main(["score", "--model", str(tmp_path), "--data", str(tmp_path),
                     "--tokens", str(tmp_path / "t.safetensors")]) == 2
    assert "token file" in capsys.readouterr().err


def amplified_unet(seed=0):
    """A random tiny UNet whose text path and output are scaled up (see the test below)."""
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    m = UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 32),
        norm_num_groups=8, attention_head_dim=8, down_block_types=("CrossAttnDownBlock2D",) * 2,
        up_block_types=("CrossAttnUpBlock2D",) * 2, cross_attention_dim=W)
    with torch.no_grad():
        for name, mod in m.named_modules():
            if name.endswith("attn2"):
                mod.to_out[0].weight.mul_(10)
        m.conv_out.weight.mul_(5)
        m.conv_out.bias.mul_(5)
    return m


def test_softrepa_training_raises_the_alignment_score(tmp_path):
    """A few hundred SoftREPA steps make matched captions win the diffusion classifier.

    Setting, and why it is learnable: a frozen random UNet has no image-caption relation that
    survives a change of noise, except at small t, where z_t ~ x0 and a pair's error is
    dominated by the deterministic term mean(f(x0_i, c_j)^2); so training and scoring use
    t < 100. The cross-attention output (x10) and conv_out (x5) are scaled up so that captions
    and tokens move that term well above the noise cross term. Without tokens one caption gives
    the lowest error for every image (accuracy = chance); the shared, time-dependent tokens
    must reshape the caption-dependent errors so each image's own caption wins.

    Calibration: an untrained model cannot predict noise, so its errors are ~3.4, far above a
    trained SD model's, and the official logits 4*exp(-E/0.07) underflow to 0 (no gradient).
    We use tau = 0.5 and scale = 4*exp(3/0.5), i.e. the official logit form with the error
    floor E0 = 3 taken out: 4*exp(-(E - 3)/0.5). lr 0.05 instead of 1e-3 keeps it to 300 steps.
    """
    backend = DiffusersBackend(amplified_unet())
    g = torch.Generator().manual_seed(1)
    x0, cond = torch.randn(4, 4, 8, 8, generator=g), {"context": torch.randn(4, 8, W, generator=g)}
    layout = TokenLayout(arch="sd15", method="softrepa", n_tokens=4, width=W, text_width=W, blocks=("down", "mid"))
    ts = (25, 50, 75)
    # The 4 training pairs scored 4 times over (one group each): 4 fixed noises per t.
    val = (x0.repeat(4, 1, 1, 1), {"context": cond["context"].repeat(4, 1, 1)})
    cfg = TrainConfig(steps=300, batch=4, seed=0, lr=0.05, t_max=100, tau=0.5, scale=4 * math.exp(3 / 0.5),
                      val_every=100, ckpt_every=0, score_ts=ts)
    res = Trainer(backend, layout, TensorData(x0, cond, 4), cfg, tmp_path / "t.safetensors", val=val,
                  progress=False).run()
    final = res.history["val"][-1]
    print("validation history:", [(v["step"], v["accuracy"]) for v in res.history["val"]],
          "without tokens:", final["accuracy_base"])
    assert final["accuracy_base"] <= 0.25 + 1e-9
    assert final["accuracy"] >= 0.25 + 0.35
    assert final["accuracy"] > final["accuracy_base"] + 0.35
    assert res.best["accuracy"] >= final["accuracy"]
