"""Diffusers-side insertion against a straightforward reference written from ALGORITHMS section 1."""

import pytest
import torch

from tiny_models import tiny_sd3, tiny_unet
from training.diffusers_hooks import TokenInjector
from training.layouts import TokenLayout
from training.tokens import SoftTokens


def ref_bucket(t):
    """ALGORITHMS 1.1: int cast, if any >= 1000 subtract 1 from all, then // 10."""
    ti = [int(v) for v in t.tolist()]
    if any(v >= 1000 for v in ti):
        ti = [v - 1 for v in ti]
    return [v // 10 for v in ti]


def ref_unet_tokens(tok, t, set_index):
    """s(t) = static + E[bucket(t)] for every sample (ALGORITHMS 1.2)."""
    out = []
    for b, row in zip(ref_bucket(t), set_index):
        s = tok.static[row, 0].clone()
        if tok.time is not None:
            s = s + tok.time[b]
        out.append(s)
    return torch.stack(out)


class SwapContext:
    """Reference attention processor: uses a fixed, precomputed context instead of the given one."""

    def __init__(self, inner, context):
        self.inner, self.context = inner, context

    def __call__(self, attn, hidden_states, encoder_hidden_states=None, **kw):
        return self.inner(attn, hidden_states, encoder_hidden_states=self.context, **kw)


GROUPS = {"down": "down_blocks", "mid": "mid_block", "up": "up_blocks"}


def reference_unet(model, x, t, ctx, tok, set_index):
    s = ref_unet_tokens(tok, t, set_index)
    ctx_tok = torch.cat([ctx[:, :1], s, ctx[:, 1:]], dim=1)  # after BOS: 77 -> 77 + m
    saved = {}
    for group in tok.layout.blocks:
        mods = getattr(model, GROUPS[group])
        for mod in ([mods] if group == "mid" else mods):
            for name, m in mod.named_modules():
                if name.endswith("attn2"):
                    saved[m] = m.processor
                    m.processor = SwapContext(m.processor, ctx_tok)
    try:
        return model(x, t, encoder_hidden_states=ctx).sample
    finally:
        for m, p in saved.items():
            m.processor = p


@pytest.mark.parametrize("width, blocks", [(768, ("down",)), (768, ("down", "mid")), (2048, ("down", "mid", "up"))])
@pytest.mark.parametrize("method", ["softrepa", "agsm"])
def test_unet_insertion_matches_reference(width, blocks, method):
    model = tiny_unet(width)
    lay = TokenLayout(arch="sd15" if width == 768 else "sdxl", method=method, n_tokens=4, width=width,
                      text_width=width, blocks=blocks)
    tok = SoftTokens(lay, generator=torch.Generator().manual_seed(1))
    tok.static.data.mul_(50)  # make the tokens matter
    tok.time.data.mul_(50)
    x, ctx = torch.randn(3, 4, 8, 8), torch.randn(3, 77, width)
    t = torch.tensor([999, 517, 3])
    set_index = torch.tensor([0, 1, 0]) if method == "agsm" else torch.tensor([0, 0, 0])
    with torch.no_grad():
        base = model(x, t, encoder_hidden_states=ctx).sample
        ref = reference_unet(model, x, t, ctx, tok, set_index.tolist())
        inj = TokenInjector(model, tok)
        with inj.tokens_set(set_index if method == "agsm" else 0):
            ours = model(x, t, encoder_hidden_states=ctx).sample
        inj.remove()
        after = model(x, t, encoder_hidden_states=ctx).sample
    assert (ours - ref).abs().max().item() <= 1e-5
    assert (ours - base).abs().max().item() > 1e-3  # the tokens act
    assert torch.equal(after, base)  # removal restores the model exactly


def reference_sd3(model, x, t, ctx, pooled, tok, set_index):
    """A straight re-implementation of the SoftREPA/AGSM SD3 loop (ALGORITHMS 1.1, 1.3)."""
    lay = tok.layout
    h, w = x.shape[-2:]
    hs = model.pos_embed(x)
    temb = model.time_text_embed(t, pooled)
    ehs = model.context_embedder(ctx)
    n = ehs.shape[1]
    buckets = ref_bucket(t)
    W = lay.text_width
    for k, block in enumerate(model.transformer_blocks):
        if lay.position == "prepend":
            ehs = ehs[:, -n:]
        else:
            ehs = ehs[:, :n]
        if k in lay.blocks:
            layer = lay.blocks.index(k)
            rows = []
            for i, b in enumerate(buckets):
                s = tok.static[set_index[i], layer]
                if lay.projected:
                    s = model.context_embedder(s)
                rows.append(s + tok.time[b, layer * W:(layer + 1) * W])
            s = torch.stack(rows)
            ehs = torch.cat([s, ehs], 1) if lay.position == "prepend" else torch.cat([ehs, s], 1)
        ehs, hs = block(hidden_states=hs, encoder_hidden_states=ehs, temb=temb)
    hs = model.proj_out(model.norm_out(hs, temb))
    p = model.config.patch_size
    hs = hs.reshape(x.shape[0], h // p, w // p, p, p, model.out_channels)
    return torch.einsum("nhwpqc->nchpwq", hs).reshape(x.shape[0], model.out_channels, h, w)


@pytest.fixture(scope="module")
def sd3_model():
    return tiny_sd3()


@pytest.mark.parametrize("method, width, blocks", [
    ("softrepa", 1536, (0, 1)), ("softrepa", 4096, (0, 1, 2)), ("agsm", 1536, (0, 2)),
])
def test_sd3_insertion_matches_reference(sd3_model, method, width, blocks):
    model = sd3_model
    lay = TokenLayout(arch="sd3", method=method, n_tokens=4, width=width, text_width=1536, blocks=blocks)
    tok = SoftTokens(lay, generator=torch.Generator().manual_seed(2))
    tok.static.data.mul_(20)
    x, ctx, pooled = torch.randn(2, 4, 8, 8), torch.randn(2, 10, 4096), torch.randn(2, 64)
    t = torch.tensor([1000.0, 421.7])  # exercises the >= 1000 rule
    set_index = [0, 1] if method == "agsm" else [0, 0]
    with torch.no_grad():
        base = model(x, ctx, pooled, t).sample
        ref = reference_sd3(model, x, t, ctx, pooled, tok, set_index)
        inj = TokenInjector(model, tok)
        with inj.tokens_set(torch.tensor(set_index) if method == "agsm" else 0):
            ours = model(x, ctx, pooled, t).sample
        inj.remove()
    assert (ours - ref).abs().max().item() <= 1e-5
    assert (ours - base).abs().max().item() > 1e-4


def test_sd3_gradient_checkpointing_path(sd3_model):
    lay = TokenLayout(arch="sd3", method="softrepa", n_tokens=2, width=1536, text_width=1536, blocks=(0,))
    tok = SoftTokens(lay)
    model = sd3_model
    x, ctx, pooled, t = torch.randn(1, 4, 8, 8), torch.randn(1, 5, 4096), torch.randn(1, 64), torch.tensor([500.0])
    inj = TokenInjector(model, tok)
    try:
        out = model(x, ctx, pooled, t).sample
        out.square().mean().backward()
        g1 = tok.static.grad.clone()
        tok.static.grad = None
        model.enable_gradient_checkpointing()
        model.train()
        out2 = model(x, ctx, pooled, t).sample
        out2.square().mean().backward()
        assert torch.allclose(out, out2, atol=1e-6)
        assert torch.allclose(tok.static.grad, g1, rtol=1e-4, atol=1e-8)
    finally:
        model.disable_gradient_checkpointing()
        model.eval()
        inj.remove()
        model.zero_grad(set_to_none=True)


def test_injector_rejects_mismatched_tokens():
    model = tiny_unet(768)
    lay = TokenLayout(arch="sdxl", method="softrepa", n_tokens=4, width=2048, text_width=2048, blocks=("down",))
    with pytest.raises(ValueError, match="2048.*768"):
        TokenInjector(model, SoftTokens(lay))
