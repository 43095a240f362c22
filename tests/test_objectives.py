"""SoftREPA and AGSM objectives against direct reference computations written from ALGORITHMS
sections 2, 3 and 9, and chunked (memory-bounded) evaluation against the naive all-pairs step."""

import math

import pytest
import torch

from tiny_models import tiny_sd3, tiny_unet
from training.diffusers_backend import DiffusersBackend
from training.diffusers_hooks import TokenInjector
from training.layouts import TokenLayout
from training.objectives import (agsm_step, agsm_targets, ema_update, new_ema_tokens, pair_errors,
                                 softrepa_loss, softrepa_loss_grad, softrepa_step)
from training.tokens import SoftTokens

W = 32  # text width of the tiny models


# --- fixtures ----------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def unet():
    return tiny_unet(W)


@pytest.fixture(scope="module")
def sd3():
    return tiny_sd3(num_layers=2, heads=2, head_dim=16, joint_attention_dim=W)


def make_tokens(family, method, seed=1, gain=30.0):
    if family == "unet":
        lay = TokenLayout(arch="sd15", method=method, n_tokens=2, width=W, text_width=W, blocks=("down", "mid"))
    else:
        lay = TokenLayout(arch="sd3", method=method, n_tokens=2, width=W, text_width=W, blocks=(0, 1))
    tok = SoftTokens(lay, generator=torch.Generator().manual_seed(seed))
    with torch.no_grad():
        tok.static.mul_(gain)  # large enough that prompts and token sets matter
        tok.time.mul_(gain)
    return tok


def make_batch(family, B, n_noise=1, seed=0):
    g = torch.Generator().manual_seed(seed)
    x0 = torch.randn(B, 4, 8, 8, generator=g)
    if family == "unet":
        cond = {"context": torch.randn(B, 7, W, generator=g)}
    else:
        cond = {"context": torch.randn(B, 6, W, generator=g), "pooled": torch.randn(B, 64, generator=g)}
    noise = torch.randn(n_noise, 4, 8, 8, generator=g)
    return x0, cond, noise


def grads(tok):
    return [p.grad.clone() if p.grad is not None else torch.zeros_like(p) for p in (tok.static, tok.time)]


def zero(tok):
    for p in tok.parameters():
        p.grad = None


def assert_rel(a, b, tol):
    for x, y in zip(a, b):
        scale = y.abs().max().item()
        assert scale > 0
        assert (x - y).abs().max().item() <= tol * scale


# --- references written from the spec ----------------------------------------------------------

def ref_abar(t):
    """SD's scaled_linear DDPM schedule: betas = linspace(sqrt(0.00085), sqrt(0.012), 1000)^2."""
    betas = torch.linspace(0.00085 ** 0.5, 0.012 ** 0.5, 1000, dtype=torch.float64) ** 2
    return torch.cumprod(1 - betas, 0)[t].item()


def ref_forward(family, x0_i, eps, t):
    """(z_t, target) for one image: DDIM add_noise / eps (UNet), (1-s)x0 + s eps / eps - x0 (SD3)."""
    if family == "unet":
        a = ref_abar(t)
        return math.sqrt(a) * x0_i + math.sqrt(1 - a) * eps, eps
    s = t / 1000
    return (1 - s) * x0_i + s * eps, eps - x0_i


def ref_pred(model, family, z, t, cond, j):
    """One pair through the model (the injector installed by the caller adds the tokens)."""
    tt = torch.tensor([t])
    if family == "unet":
        return model(z[None], tt, encoder_hidden_states=cond["context"][j:j + 1]).sample[0]
    return model(z[None], cond["context"][j:j + 1], cond["pooled"][j:j + 1], tt).sample[0]


def ref_softrepa_loss(E, scale=4.0, tau=0.07, dweight=0.0):
    """mean_i [-log softmax_j(s exp(-E_ij/tau))_i] + dweight mean_i E_ii, as a plain loop."""
    B = E.shape[0]
    total = 0.0
    for i in range(B):
        logits = [scale * torch.exp(-E[i, j] / tau) for j in range(B)]
        denom = sum(torch.exp(v) for v in logits)
        total = total + (-(logits[i] - torch.log(denom))) + dweight * E[i, i]
    return total / B


def ref_softrepa(model, family, tok, x0, cond, t, eps, **kw):
    """E (rows images, columns prompts) from one pair at a time, and the loss."""
    B = x0.shape[0]
    inj = TokenInjector(model, tok)
    try:
        rows = []
        for i in range(B):
            z, u = ref_forward(family, x0[i], eps[0], t)
            rows.append(torch.stack([(u - ref_pred(model, family, z, t, cond, j)).square().mean() for j in range(B)]))
    finally:
        inj.remove()
    E = torch.stack(rows)
    return ref_softrepa_loss(E, **kw), E


def ref_agsm(model, family, tok, ema, x0, cond, t, eps, nrows=None, gp=1.0, gn=1.0, T=0.1):
    """AGSM's loss as a loop over official row chunks, rows and prompts (ALGORITHMS 3.1-3.2)."""
    B = x0.shape[0]
    nrows = nrows or B
    inj = TokenInjector(model, tok)
    loss, weights, errors = 0.0, torch.zeros(B, B), torch.zeros(B, B)
    try:
        for c, r0 in enumerate(range(0, B, nrows)):
            rows = range(r0, min(r0 + nrows, B))
            n_b, n_p = len(rows), B
            for i in rows:
                z, u = ref_forward(family, x0[i], eps[c], t)
                q = []
                with torch.no_grad():
                    for j in range(B):
                        with inj.using(ema, 0 if j == i else 1):
                            q.append(ref_pred(model, family, z, t, cond, j))
                r = torch.stack([-(u - qj).square().mean() for qj in q])
                w = torch.exp(r / T) / torch.exp(r / T).sum()
                weights[i], errors[i] = w, -r
                qbar = sum(w[j] * q[j] for j in range(B))
                for j in range(B):
                    delta = q[j] - qbar
                    if j == i:
                        y = u + gp * delta
                    elif gn > 0:
                        y = u - gn * delta
                    else:
                        continue
                    with inj.using(tok, 0 if j == i else 1):
                        p = ref_pred(model, family, z, t, cond, j)
                    m = (p - y).square().mean()
                    loss = loss + (m / n_b if j == i else m / (n_b * (n_p - 1)))
    finally:
        inj.remove()
    return loss, weights, errors


# --- SoftREPA ----------------------------------------------------------------------------------

@pytest.mark.parametrize("B", [2, 4, 7])
@pytest.mark.parametrize("kw", [{}, {"scale": 2.5, "tau": 0.3, "dweight": 10.0}])
def test_softrepa_loss_matches_reference(B, kw):
    E = torch.rand(B, B) * 0.5
    ours = softrepa_loss(E, **kw)
    ref = ref_softrepa_loss(E.double(), **kw)
    assert abs(ours.item() - ref.item()) <= 1e-6


@pytest.mark.parametrize("kw", [{}, {"scale": 2.5, "tau": 0.3, "dweight": 10.0}])
def test_softrepa_closed_form_gradient(kw):
    E = (torch.rand(5, 5, dtype=torch.float64) * 0.4).requires_grad_(True)
    g_auto, = torch.autograd.grad(ref_softrepa_loss(E, **kw), E)
    g_ours = softrepa_loss_grad(E, **kw)
    assert (g_ours - g_auto).abs().max().item() <= 1e-10 * max(1.0, g_auto.abs().max().item())


def test_softrepa_loss_lower_bound():
    """Logits lie in (0, s], so the loss is at least log(1 + (B-1) e^{-s}) (ALGORITHMS 2.2)."""
    E = torch.full((4, 4), 10.0)
    E.fill_diagonal_(0.0)
    assert abs(softrepa_loss(E).item() - math.log(1 + 3 * math.exp(-4.0))) <= 1e-6


@pytest.mark.parametrize("family", ["unet", "sd3"])
def test_softrepa_step_matches_reference(family, unet, sd3):
    model = unet if family == "unet" else sd3
    backend = DiffusersBackend(model)
    tok = make_tokens(family, "softrepa")
    B, t = 3, 617
    x0, cond, eps = make_batch(family, B)
    kw = {"scale": 4.0, "tau": 0.07, "dweight": 2.0}
    ref_loss, ref_E = ref_softrepa(model, family, tok, x0, cond, t, eps, **kw)
    ref_g = torch.autograd.grad(ref_loss, [tok.static, tok.time])
    zero(tok)
    out = softrepa_step(backend, tok, x0, cond, torch.tensor([t]), eps, **kw)
    assert out["mode"] == "naive"
    assert (out["E"] - ref_E).abs().max().item() <= 1e-6
    assert abs(out["loss"] - ref_loss.item()) <= 1e-6
    assert_rel(grads(tok), ref_g, 1e-5)
    # the rows are images and the columns prompts: the matched pairs are not all alike
    assert ref_E.std().item() > 1e-3


@pytest.mark.parametrize("B, chunks", [(2, [3]), (3, [2, 4, 7]), (5, [3, 7, 11])])
def test_softrepa_chunked_gradient_equals_naive(B, chunks, unet):
    backend = DiffusersBackend(unet)
    tok = make_tokens("unet", "softrepa")
    x0, cond, eps = make_batch("unet", B, seed=B)
    t = torch.tensor(480)
    kw = {"dweight": 1.0}
    naive = softrepa_step(backend, tok, x0, cond, t, eps, **kw)
    g_naive = grads(tok)
    modes = set()
    for chunk in chunks:
        for two_pass in ([None, True] if chunk == min(c for c in chunks if c >= B) else [None]):
            zero(tok)
            out = softrepa_step(backend, tok, x0, cond, t, eps, chunk=chunk, two_pass=two_pass, **kw)
            modes.add(out["mode"])
            assert abs(out["loss"] - naive["loss"]) <= 1e-6 * max(1.0, abs(naive["loss"]))
            assert (out["E"] - naive["E"]).abs().max().item() <= 1e-6
            assert_rel(grads(tok), g_naive, 1e-5)
    assert "two_pass" in modes


def test_softrepa_chunk_bounds_denoiser_batch(unet):
    backend = DiffusersBackend(unet)
    tok = make_tokens("unet", "softrepa")
    x0, cond, eps = make_batch("unet", 4)
    sizes = []
    predict = backend.predict
    backend.predict = lambda z, *a, **k: sizes.append(z.shape[0]) or predict(z, *a, **k)
    softrepa_step(backend, tok, x0, cond, 300, eps, chunk=3)
    assert max(sizes) == 3 and sum(sizes) == 2 * 16  # two passes over 16 pairs
    sizes.clear()
    softrepa_step(backend, tok, x0, cond, 300, eps, chunk=9)
    assert max(sizes) <= 9 and sum(sizes) == 16  # whole rows: one pass


def test_pair_errors_equals_step_E(unet):
    backend = DiffusersBackend(unet)
    tok = make_tokens("unet", "agsm")
    x0, cond, eps = make_batch("unet", 3)
    E = pair_errors(backend, x0, cond, 200, eps, tok, chunk=4)
    ref = ref_softrepa(unet, "unet", tok, x0, cond, 200, eps)[1]
    assert (E - ref).abs().max().item() <= 1e-6
    assert not E.requires_grad and tok.static.grad is None
    # set_index_fn picks the token set per pair: psi- everywhere differs from psi+ everywhere
    E_neg = pair_errors(backend, x0, cond, 200, eps, tok, chunk=4,
                        set_index_fn=lambda i, j: torch.ones_like(i))
    assert (E_neg - E).abs().max().item() > 1e-4
    # a different number of prompts than images
    E_rect = pair_errors(backend, x0, {"context": cond["context"][:2]}, 200, eps, tok)
    assert E_rect.shape == (3, 2) and (E_rect - E[:, :2]).abs().max().item() <= 1e-6


# --- AGSM --------------------------------------------------------------------------------------

def test_agsm_targets_weights_and_delta():
    g = torch.Generator().manual_seed(3)
    n_b, n_p = 3, 4
    u = torch.randn(n_b, 2, 3, 3, generator=g)
    q = u[:, None] + 0.3 * torch.randn(n_b, n_p, 2, 3, 3, generator=g)
    labels = torch.tensor([2, 0, 3])
    y, w, delta = agsm_targets(u, q, labels, gamma_pos=1.5, gamma_neg=0.25, temp=0.1)
    assert torch.allclose(w.sum(1), torch.ones(n_b), atol=1e-6)
    for i in range(n_b):
        r = torch.stack([-(u[i] - q[i, j]).square().mean() for j in range(n_p)])
        w_ref = torch.exp(r / 0.1) / torch.exp(r / 0.1).sum()
        assert (w[i] - w_ref).abs().max().item() <= 1e-6
        qbar = sum(w_ref[j] * q[i, j] for j in range(n_p))
        for j in range(n_p):
            d = q[i, j] - qbar
            assert (delta[i, j] - d).abs().max().item() <= 1e-6
            y_ref = u[i] + 1.5 * d if j == labels[i] else u[i] - 0.25 * d
            assert (y[i, j] - y_ref).abs().max().item() <= 1e-6
    # the weighted mean of the guidance is zero in every row
    assert torch.einsum("bp,bp...->b...", w, delta).abs().max().item() <= 1e-6
    # targets are detached even when the inputs carry grad
    assert not agsm_targets(u.requires_grad_(), q.requires_grad_(), labels)[0].requires_grad


@pytest.mark.parametrize("family, gn", [("unet", 1.0), ("sd3", 0.1)])
def test_agsm_step_matches_reference(family, gn, unet, sd3):
    model = unet if family == "unet" else sd3
    backend = DiffusersBackend(model)
    tok = make_tokens(family, "agsm", seed=1)
    ema = make_tokens(family, "agsm", seed=2)
    B, t = 3, 555
    x0, cond, eps = make_batch(family, B)
    ref_loss, ref_w, ref_E = ref_agsm(model, family, tok, ema, x0, cond, t, eps, gp=1.0, gn=gn)
    ref_g = torch.autograd.grad(ref_loss, [tok.static, tok.time])
    zero(tok)
    out = agsm_step(backend, tok, ema, x0, cond, t, eps, gamma_pos=1.0, gamma_neg=gn)
    assert abs(out["loss"] - ref_loss.item()) <= 1e-6
    assert abs(out["loss_pos"] + out["loss_neg"] - out["loss"]) <= 1e-9
    assert (out["E_ema"] - ref_E).abs().max().item() <= 1e-6
    # w = softmax(-E_ema / 0.1) magnifies float32 differences of E_ema (batched vs one pair) 10x
    assert (out["w"] - ref_w).abs().max().item() <= 1e-5
    assert torch.allclose(out["w"].sum(1), torch.ones(B), atol=1e-6)
    assert_rel(grads(tok), ref_g, 1e-5)
    assert tok.static.grad[0].abs().max() > 0 and tok.static.grad[1].abs().max() > 0


def test_agsm_official_row_chunks(unet):
    """nrows: each row chunk draws its own noise and the chunk losses are summed (AG:train.py)."""
    backend = DiffusersBackend(unet)
    tok, ema = make_tokens("unet", "agsm", seed=1), make_tokens("unet", "agsm", seed=2)
    x0, cond, eps = make_batch("unet", 3, n_noise=2)
    ref_loss = ref_agsm(unet, "unet", tok, ema, x0, cond, 321, eps, nrows=2)[0]
    ref_g = torch.autograd.grad(ref_loss, [tok.static, tok.time])
    for chunk in (None, 4):
        zero(tok)
        out = agsm_step(backend, tok, ema, x0, cond, 321, eps, nrows=2, chunk=chunk)
        assert abs(out["loss"] - ref_loss.item()) <= 1e-6
        assert_rel(grads(tok), ref_g, 1e-5)
    with pytest.raises(ValueError, match="one noise per row chunk"):
        agsm_step(backend, tok, ema, x0, cond, 321, eps[:1], nrows=2)


@pytest.mark.parametrize("B, chunks", [(2, [3]), (3, [2, 4, 7]), (5, [3, 7, 11])])
def test_agsm_chunked_gradient_equals_naive(B, chunks, unet):
    backend = DiffusersBackend(unet)
    tok, ema = make_tokens("unet", "agsm", seed=1), make_tokens("unet", "agsm", seed=2)
    x0, cond, eps = make_batch("unet", B, seed=B)
    naive = agsm_step(backend, tok, ema, x0, cond, 700, eps)
    g_naive = grads(tok)
    for chunk in chunks:
        zero(tok)
        out = agsm_step(backend, tok, ema, x0, cond, 700, eps, chunk=chunk)
        assert abs(out["loss"] - naive["loss"]) <= 1e-6 * max(1.0, naive["loss"])
        assert (out["w"] - naive["w"]).abs().max().item() <= 1e-6
        assert_rel(grads(tok), g_naive, 1e-5)


def test_agsm_gamma_neg_zero_skips_negatives(unet):
    backend = DiffusersBackend(unet)
    tok, ema = make_tokens("unet", "agsm", seed=1), make_tokens("unet", "agsm", seed=2)
    B = 3
    x0, cond, eps = make_batch("unet", B)
    calls = []
    predict = backend.predict
    backend.predict = lambda z, t, c, tokens, set_index=0: calls.append((tokens, z.shape[0], set_index)) or \
        predict(z, t, c, tokens, set_index)
    out = agsm_step(backend, tok, ema, x0, cond, 250, eps, gamma_neg=0.0, chunk=2)
    online = [(n, s) for tk, n, s in calls if tk is tok]
    assert sum(n for n, _ in online) == B  # only the B positive pairs
    assert all((s == 0).all() for _, s in online)
    assert sum(n for tk, n, _ in calls if tk is ema) == B * B  # the softmax still needs every EMA pair
    assert out["loss_neg"] == 0.0
    assert tok.static.grad[1].abs().max().item() == 0.0  # psi- gets no gradient
    assert tok.static.grad[0].abs().max().item() > 0
    ref_loss = ref_agsm(unet, "unet", tok, ema, x0, cond, 250, eps, gn=0.0)[0]
    assert abs(out["loss"] - ref_loss.item()) <= 1e-6


def test_agsm_no_gradient_reaches_ema(unet):
    backend = DiffusersBackend(unet)
    tok = make_tokens("unet", "agsm", seed=1)
    ema = make_tokens("unet", "agsm", seed=2)  # requires_grad on purpose: the step must detach
    x0, cond, eps = make_batch("unet", 2)
    agsm_step(backend, tok, ema, x0, cond, 900, eps, chunk=3)
    assert ema.static.grad is None and ema.time.grad is None
    assert tok.static.grad is not None
    assert all(p.grad is None for p in unet.parameters())


def test_ema_update_formula():
    lay = make_tokens("unet", "agsm").layout
    tok = SoftTokens(lay, generator=torch.Generator().manual_seed(5))
    ema = new_ema_tokens(lay, generator=torch.Generator().manual_seed(6))
    before = [p.clone() for p in ema.parameters()]
    ema_update(ema, tok, decay=0.9)
    for e0, e1, p in zip(before, ema.parameters(), tok.parameters()):
        assert (e1 - (0.9 * e0 + 0.1 * p)).abs().max().item() <= 1e-7
    assert all(not p.requires_grad for p in ema.parameters())
    ema_update(ema, tok)  # default decay 0.9999
    ema_update(ema, tok, decay=0.0)
    assert all(torch.equal(e, p) for e, p in zip(ema.parameters(), tok.parameters()))
    other = make_tokens("sd3", "agsm").layout
    with pytest.raises(ValueError, match="layout"):
        ema_update(new_ema_tokens(other), tok)


def test_ema_tokens_independent_init():
    lay = make_tokens("unet", "agsm").layout
    tok = SoftTokens(lay, generator=torch.Generator().manual_seed(0))
    ema = new_ema_tokens(lay, generator=torch.Generator().manual_seed(1))
    assert not torch.equal(ema.static, tok.static)
    assert abs(ema.static.std().item() - 0.02) < 0.01 and abs(ema.time.std().item() - 0.02) < 0.002
    assert ema.layout == lay


# --- bad input ---------------------------------------------------------------------------------

def test_steps_reject_bad_input(unet):
    backend = DiffusersBackend(unet)
    sr, ag = make_tokens("unet", "softrepa"), make_tokens("unet", "agsm")
    x0, cond, eps = make_batch("unet", 3)
    with pytest.raises(ValueError, match="at least 2"):
        softrepa_step(backend, sr, x0[:1], {"context": cond["context"][:1]}, 10, eps)
    with pytest.raises(ValueError, match="one prompt per image"):
        softrepa_step(backend, sr, x0, {"context": cond["context"][:2]}, 10, eps)
    with pytest.raises(ValueError, match="noise"):
        softrepa_step(backend, sr, x0, cond, 10, torch.randn(2, 4, 8, 8))
    with pytest.raises(ValueError, match="one timestep"):
        softrepa_step(backend, sr, x0, cond, torch.tensor([1, 2]), eps)
    with pytest.raises(ValueError, match="chunk"):
        softrepa_step(backend, sr, x0, cond, 10, eps, chunk=0)
    with pytest.raises(ValueError, match="two_pass"):
        softrepa_step(backend, sr, x0, cond, 10, eps, chunk=2, two_pass=False)
    with pytest.raises(ValueError, match="psi"):
        agsm_step(backend, sr, sr, x0, cond, 10, eps)
    with pytest.raises(ValueError, match="gamma"):
        agsm_step(backend, ag, ag, x0, cond, 10, eps, gamma_neg=-1.0)
    assert sr.static.grad is None and ag.static.grad is None  # nothing ran


def test_grad_scale_scales_gradients_only(unet):
    backend = DiffusersBackend(unet)
    sr = make_tokens("unet", "softrepa")
    tok, ema = make_tokens("unet", "agsm", seed=1), make_tokens("unet", "agsm", seed=2)
    x0, cond, eps = make_batch("unet", 3)
    for step, args in ((softrepa_step, (sr,)), (agsm_step, (tok, ema))):
        params = args[0]
        ref = step(backend, *args, x0, cond, 432, eps, chunk=2)
        g_ref = grads(params)
        zero(params)
        out = step(backend, *args, x0, cond, 432, eps, chunk=2, grad_scale=8.0)
        assert out["loss"] == ref["loss"]
        assert_rel([g / 8.0 for g in grads(params)], g_ref, 1e-6)
