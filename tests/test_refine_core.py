"""Step-selected refinement's core: attention maps, losses, subjects, the diffusers capture and IterRef."""

import math

import pytest
import torch

from tiny_models import tiny_sd3, tiny_unet
from training.attention_maps import (Stream, attention_probs, batch_loss, cn_loss, find_subject, iou_loss,
                                     parse_subjects, refinement_loss, smooth, step_size, subject_maps,
                                     subject_positions)
from training.diffusers_hooks import TokenInjector
from training.layouts import TokenLayout
from training.refine import AttentionCapture, RefineSettings, refine_latent
from training.tokens import SoftTokens

# --- losses and maps ------------------------------------------------------------------------------


def test_cn_loss_is_the_worst_subjects_missing_peak():
    maps = torch.zeros(2, 2, 4, 4)
    maps[0, 0, 1, 1], maps[0, 1, 2, 2] = 0.9, 0.3  # image 0: subject 1 neglected
    maps[1, 0, 0, 0], maps[1, 1, 3, 3] = 1.0, 1.2  # image 1: both attended
    assert torch.allclose(cn_loss(maps), torch.tensor([0.7, 0.0]))


def test_iou_loss_is_sum_min_over_sum_of_both():
    a = torch.tensor([[1.0, 1.0], [0.0, 0.0]])
    b = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    maps = torch.stack([a, b])[None]
    assert iou_loss(maps).item() == pytest.approx(1.0 / 4.0)
    assert iou_loss(torch.stack([a, a])[None]).item() == pytest.approx(0.5)  # identical maps: the maximum
    assert iou_loss(a[None, None]).item() == 0.0  # one subject: no pair
    three = torch.stack([a, b, a])[None]
    assert iou_loss(three).item() == pytest.approx((0.25 + 0.5 + 0.25) / 3)


def test_combined_loss_is_the_mean_and_streams_are_averaged_first():
    m1, m2 = torch.rand(3, 2, 4, 4), torch.rand(3, 2, 4, 4)
    out = refinement_loss([m1, m2], "cn+iou")
    avg = (m1 + m2) / 2
    assert torch.allclose(out["cn"], cn_loss(avg)) and torch.allclose(out["iou"], iou_loss(avg))
    assert torch.allclose(out["loss"], (cn_loss(avg) + iou_loss(avg)) / 2)
    with pytest.raises(ValueError, match="loss must be one of"):
        refinement_loss([m1], "max")


def test_smoothing_is_a_normalised_3x3_gaussian_with_sigma_half():
    x = torch.zeros(1, 1, 5, 5)
    x[0, 0, 2, 2] = 1.0
    y = smooth(x)[0, 0]
    g = torch.tensor([math.exp(-1 / (2 * 0.25)), 1.0, math.exp(-1 / (2 * 0.25))])
    k = g[:, None] * g[None, :]
    assert torch.allclose(y[1:4, 1:4], k / k.sum(), atol=1e-7)
    assert y.sum().item() == pytest.approx(1.0)


def test_subject_maps_renormalise_over_the_window_and_average_pieces():
    A = torch.rand(2, 3, 3, 10)
    s = Stream(columns=(2, 10), window=(1, 7), subjects=((2,), (3, 4)))
    maps = subject_maps(A, s, smoothing=False)
    win = (100 * A[..., 3:9]).softmax(-1)
    assert torch.allclose(maps[:, 0], win[..., 1])
    assert torch.allclose(maps[:, 1], (win[..., 2] + win[..., 3]) / 2)
    with pytest.raises(ValueError, match="outside the window"):
        Stream(columns=(0, 10), window=(1, 7), subjects=((8,),))


def test_step_size_matches_attend_and_excite_schedule():
    # STEP_SELECTION.md 6: alpha_2 ~ 19.79 (t = 941) and alpha_8 ~ 19.17 (t = 821) for 50 steps
    assert step_size(2, 50) == pytest.approx(19.79, abs=0.01)
    assert step_size(8, 50) == pytest.approx(19.17, abs=0.01)
    assert step_size(0, 50) == pytest.approx(20.0) and step_size(49, 50) == pytest.approx(20 * math.sqrt(0.5))
    with pytest.raises(ValueError, match="outside a schedule"):
        step_size(50, 50)


# --- subjects -------------------------------------------------------------------------------------

CLIP_PIECES = ["<|startoftext|>", "a</w>", "traff", "ic</w>", "light</w>", "and</w>", "a</w>", "cat</w>",
               ".</w>", "<|endoftext|>"]
T5_PIECES = ["\u2581a", "\u2581tra", "ffic", "\u2581light", "\u2581and", "\u2581a", "\u2581cat", ".", "</s>"]


def test_subjects_found_in_clip_and_t5_pieces():
    assert find_subject(CLIP_PIECES, "traffic", (1, 9)) == (2, 3)
    assert find_subject(CLIP_PIECES, "traffic light", (1, 9)) == (2, 3, 4)
    assert find_subject(CLIP_PIECES, "cat", (1, 9)) == (7,)
    assert find_subject(CLIP_PIECES, "ic", (1, 9)) == ()  # not a word start
    assert find_subject(CLIP_PIECES, "traff", (1, 9)) == ()  # not a word end
    assert find_subject(T5_PIECES, "traffic", (1, 8)) == (1, 2)
    assert find_subject(T5_PIECES, "cat", (1, 8)) == (6,)
    assert find_subject(T5_PIECES, "ffic", (1, 8)) == ()
    assert find_subject(["<bos>", "two", "red", "circles", "<eos>"], "circles", (1, 4)) == (3,)


def test_missing_subjects_are_named():
    with pytest.raises(ValueError, match=r"\['dog'\] not found"):
        subject_positions(CLIP_PIECES, ["cat", "dog"], (1, 9))
    assert parse_subjects(" cat, red dog\nbird ") == ["cat", "red dog", "bird"]
    with pytest.raises(ValueError, match="no subjects"):
        parse_subjects(" , ")


# --- capture on diffusers models ------------------------------------------------------------------

def _explicit_unet_probs(unet, x, t, ctx, grid):
    """softmax(q k^T * scale) of every 16-query cross-attention, recomputed from diffusers' own
    get_attention_scores on the layers' inputs (recorded by an independent hook)."""
    got = []

    def hook(attn, args, kwargs, out):
        hs = kwargs.get("hidden_states", args[0] if args else None)
        if hs.shape[1] != grid[0] * grid[1]:
            return
        ehs = kwargs["encoder_hidden_states"]
        q = attn.head_to_batch_dim(attn.to_q(hs))
        k = attn.head_to_batch_dim(attn.to_k(ehs))
        p = attn.get_attention_scores(q, k)  # (B*heads, Nq, Nk)
        got.append(p.view(hs.shape[0], attn.heads, *p.shape[1:]).mean(1))

    hs = [m.register_forward_hook(hook, with_kwargs=True) for n, m in unet.named_modules() if n.endswith("attn2")]
    unet(x, t, encoder_hidden_states=ctx)
    for h in hs:
        h.remove()
    return got


def test_unet_capture_equals_explicit_softmax():
    unet = tiny_unet()
    x, t, ctx = torch.randn(2, 4, 8, 8), torch.tensor([300, 700]), torch.randn(2, 77, 768)
    with AttentionCapture(unet, grid=(4, 4)) as cap:
        unet(x, t, encoder_hidden_states=ctx)
    ref = _explicit_unet_probs(unet, x, t, ctx, (4, 4))
    assert len(cap.layers) == len(ref) == 4  # the 4x4 cross-attentions: down 1, mid, up 0 (x2)
    for a, b in zip(cap.layers, ref):
        assert (a - b).abs().max().item() <= 1e-5
    A = cap.maps()
    assert A.shape == (2, 4, 4, 77)
    assert torch.allclose(A.sum(-1), torch.ones(2, 4, 4), atol=1e-5)


def test_unet_capture_drops_soft_token_columns():
    unet = tiny_unet()
    lay = TokenLayout(arch="sd15", method="softrepa", n_tokens=4, width=768, text_width=768,
                      blocks=("down", "mid", "up"), time_buckets=0)
    tokens = SoftTokens(lay, static=torch.randn(lay.static_shape))
    inj = TokenInjector(unet, tokens)
    x, t, ctx = torch.randn(1, 4, 8, 8), torch.tensor([500]), torch.randn(1, 77, 768)
    try:
        with inj.using(tokens), AttentionCapture(unet, grid=(4, 4), token_layout=lay) as cap:
            unet(x, t, encoder_hidden_states=ctx)
        with inj.using(tokens):
            ref = _explicit_unet_probs(unet, x, t, ctx, (4, 4))
    finally:
        inj.remove()
    keep = lay.text_positions(77)
    assert keep[0] == 0 and keep[1] == 5 and len(keep) == 77
    for a, b in zip(cap.layers, ref):
        assert b.shape[-1] == 81 and a.shape[-1] == 77
        assert (a - b[..., keep]).abs().max().item() <= 1e-5
    inj = TokenInjector(unet, tokens)
    try:  # without the layout the capture cannot tell the soft-token columns apart: refused
        with pytest.raises(ValueError, match="token_layout"):
            with inj.using(tokens), AttentionCapture(unet, grid=(4, 4)):
                unet(x, t, encoder_hidden_states=ctx)
    finally:
        inj.remove()


def test_sd3_capture_equals_the_image_text_block_of_the_joint_softmax():
    model = tiny_sd3(num_layers=2, heads=2, head_dim=16, joint_attention_dim=64)
    x, t = torch.randn(2, 4, 8, 8), torch.tensor([400, 900])
    ctx, pooled = torch.randn(2, 12, 64), torch.randn(2, 64)
    got = []

    def hook(attn, args, kwargs, out):  # explicit joint attention over [image ; text]
        hs, ehs = kwargs["hidden_states"], kwargs["encoder_hidden_states"]
        b, n, _ = hs.shape
        h = attn.heads
        q = torch.cat([attn.to_q(hs), attn.add_q_proj(ehs)], 1).view(b, -1, h, 16).transpose(1, 2)
        k = torch.cat([attn.to_k(hs), attn.add_k_proj(ehs)], 1).view(b, -1, h, 16).transpose(1, 2)
        p = (q @ k.transpose(-1, -2) / math.sqrt(16)).softmax(-1).mean(1)
        got.append(p[:, :n, n:])

    hs = [blk.attn.register_forward_hook(hook, with_kwargs=True) for blk in model.transformer_blocks]
    kw = dict(hidden_states=x, encoder_hidden_states=ctx, pooled_projections=pooled, timestep=t)
    with AttentionCapture(model) as cap:
        model(**kw)
    for h in hs:
        h.remove()
    assert len(cap.layers) == len(got) == 2
    for a, b in zip(cap.layers, got):
        assert (a - b).abs().max().item() <= 1e-5
    assert cap.maps().shape == (2, 4, 4, 12)


# --- gradients and IterRef ------------------------------------------------------------------------

def _unet_loss_fn(unet, t, ctx, streams, loss="cn+iou"):
    def fn(x):
        with AttentionCapture(unet, grid=(4, 4)) as cap:
            unet(x.to(next(unet.parameters()).dtype), t, encoder_hidden_states=ctx)
        return batch_loss(cap.maps(), streams, loss)
    return fn


def test_loss_gradient_matches_finite_differences():
    unet = tiny_unet().double()
    torch.manual_seed(1)
    x = torch.randn(1, 4, 8, 8, dtype=torch.float64)
    ctx = torch.randn(1, 77, 768, dtype=torch.float64) * 3
    streams = [[Stream((0, 77), (1, 76), ((3,), (5, 6)))]]
    fn = _unet_loss_fn(unet, torch.tensor([500]), ctx, streams, "iou")
    xg = x.clone().requires_grad_(True)
    (g,) = torch.autograd.grad(fn(xg)["loss"].sum(), xg)
    d = torch.randn_like(x)
    d /= d.norm()
    eps = 1e-5
    with torch.no_grad():
        fd = (fn(x + eps * d)["loss"] - fn(x - eps * d)["loss"]).item() / (2 * eps)
    an = (g * d).sum().item()
    assert abs(an) > 1e-8
    assert an == pytest.approx(fd, rel=1e-4)


def test_iterref_lowers_the_cn_loss_on_a_tiny_unet():
    unet = tiny_unet()
    x, t, ctx = torch.randn(2, 4, 8, 8), torch.tensor([700, 700]), torch.randn(2, 77, 768) * 3
    streams = [[Stream((0, 77), (1, 76), ((3,), (6,)))]] * 2
    fn = _unet_loss_fn(unet, t, ctx, streams, "cn")
    out, hist = refine_latent(x, fn, alpha=2000.0, iterations=8)
    assert len(hist) == 8 and out.shape == x.shape and not out.requires_grad
    first, last = torch.tensor(hist[0]["cn"]), torch.tensor(hist[-1]["cn"])
    assert (last < first).all()
    assert torch.equal(refine_latent(x, fn, alpha=2000.0, iterations=0)[0], x)


def test_iterref_stops_images_below_the_threshold():
    unet = tiny_unet()
    x, t, ctx = torch.randn(2, 4, 8, 8), torch.tensor([700, 700]), torch.randn(2, 77, 768) * 3
    streams = [[Stream((0, 77), (1, 76), ((3,),))]] * 2
    fn = _unet_loss_fn(unet, t, ctx, streams, "cn")
    start = fn(x)["loss"].detach()
    thr = float(start.max()) + 1.0  # every image already satisfies it: no update, one forward
    out, hist = refine_latent(x, fn, alpha=2000.0, iterations=5, threshold=thr)
    assert len(hist) == 1 and torch.equal(out, x)


def test_refine_settings_reject_bad_values():
    with pytest.raises(ValueError, match="loss must be"):
        RefineSettings(loss="max")
    with pytest.raises(ValueError, match="iterations"):
        RefineSettings(iterations=-1)
    with pytest.raises(ValueError, match="step size"):
        RefineSettings(scale=float("nan"))


def test_attention_probs_applies_additive_and_boolean_masks():
    q, k = torch.randn(1, 2, 3, 4), torch.randn(1, 2, 5, 4)
    add = torch.zeros(1, 1, 1, 5)
    add[..., 4] = -math.inf
    p = attention_probs(q, k, 0.5, add)
    assert torch.all(p[..., 4] == 0) and torch.allclose(p.sum(-1), torch.ones(1, 3))
    keep = torch.ones(1, 1, 1, 5, dtype=torch.bool)
    keep[..., 4] = False
    assert torch.allclose(attention_probs(q, k, 0.5, keep), p)
