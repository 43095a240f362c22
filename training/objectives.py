"""The SoftREPA and AGSM training objectives (ALGORITHMS 2, 3, 9; pitfalls 1-5, 14-16).

A step takes B images x0 (B, C, h, w) and their B captions (prompt j is image j's caption),
one timestep t and one noise tensor (1, C, h, w) shared by every pair, evaluates all B*B
(image, prompt) pairs with the soft tokens, and accumulates the loss gradient into the token
parameters with backward(). It never steps the optimizer.

Memory: ``chunk`` bounds the pairs per denoiser call. The result never depends on it:
- SoftREPA's loss couples the pairs of an image row through the softmax over prompts. If a
  chunk holds at least one full row (chunk >= B), chunks of whole rows are backpropagated
  directly (the loss is a sum over rows). Otherwise a GradCache-style two-pass scheme runs:
  all errors E without grad, dL/dE in closed form, then each chunk is recomputed with grad
  and sum(dL/dE * E_chunk) is backpropagated. ``two_pass=True`` forces the latter.
- AGSM's loss is a sum over pairs with detached targets: the EMA pass (no grad) comes first,
  then the online pass is backpropagated chunk by chunk.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .layouts import TokenLayout
from .pairs import (check_chunk, chunk_slices, forward_process, pair_errors, pair_grid, pair_mse,
                    predict_pairs, step_t, to_matrix)
from .tokens import SoftTokens

__all__ = ["softrepa_loss", "softrepa_loss_grad", "softrepa_row_losses", "softrepa_step", "agsm_targets",
           "agsm_step", "ema_update", "new_ema_tokens", "pair_errors"]


# --- SoftREPA ------------------------------------------------------------------------------

def softrepa_row_losses(E_rows: torch.Tensor, labels: torch.Tensor, scale: float = 4.0, tau: float = 0.07,
                        dweight: float = 0.0) -> torch.Tensor:
    """Per image row: CE over prompts of logits scale*exp(-E/tau) with the matched prompt as
    the label, plus dweight * E[row, label]. E_rows: (n, P); labels: (n,). Returns (n,)."""
    logits = scale * torch.exp(-E_rows / tau)
    ce = F.cross_entropy(logits, labels, reduction="none")
    return ce + dweight * E_rows.gather(1, labels[:, None])[:, 0]


def softrepa_loss(E: torch.Tensor, scale: float = 4.0, tau: float = 0.07, dweight: float = 0.0) -> torch.Tensor:
    """SoftREPA's loss on the error matrix E (B images x B prompts, diagonal = matched pairs):
    mean_i CE(scale*exp(-E_i./tau), i) + dweight * mean_i E_ii (ALGORITHMS 2.2)."""
    _check_square(E)
    labels = torch.arange(E.shape[0], device=E.device)
    return softrepa_row_losses(E, labels, scale, tau, dweight).mean()


def softrepa_loss_grad(E: torch.Tensor, scale: float = 4.0, tau: float = 0.07, dweight: float = 0.0,
                       labels: torch.Tensor | None = None, batch: int | None = None) -> torch.Tensor:
    """dL/dE of softrepa_loss in closed form:
    (1/B) * [(softmax_j(l_i.) - 1[i=j]) * (-l_ij / tau) + dweight * 1[i=j]], l = scale*exp(-E/tau).

    For some image rows of a batch: E (n, B) those rows, ``labels`` (n,) their matched prompts
    and ``batch`` the global B (defaults: the square matrix of every row)."""
    if labels is None:
        _check_square(E)
        labels = torch.arange(E.shape[0], device=E.device)
    B = E.shape[1] if batch is None else batch
    E = E.detach()
    logits = scale * torch.exp(-E / tau)
    onehot = F.one_hot(labels.to(E.device), E.shape[1]).to(E.dtype)
    return ((torch.softmax(logits, dim=1) - onehot) * (-logits / tau) + dweight * onehot) / B


def softrepa_step(backend, tokens: SoftTokens, x0: torch.Tensor, cond: dict, t, noise: torch.Tensor, *,
                  scale: float = 4.0, tau: float = 0.07, dweight: float = 0.0, chunk: int | None = None,
                  two_pass: bool | None = None, grad_scale: float = 1.0, rows: torch.Tensor | None = None) -> dict:
    """One SoftREPA step: accumulate dL/dtokens over all B*B pairs; no optimizer step.

    chunk: pairs per denoiser call (None: all pairs at once). two_pass: when chunk < B*B, None
    chooses whole-row chunks if chunk >= B and the GradCache scheme otherwise; True forces
    GradCache. grad_scale multiplies the backpropagated loss (fp16 loss scaling, e.g. a
    GradScaler's scale; unscale before the optimizer step); the returned loss is unscaled.
    rows: the image rows to evaluate (a LongTensor; None = all B). The loss is a sum over rows,
    so the rows of a batch split across processes give partial losses and gradients that sum
    to the whole batch's (training/distributed.py); the normalisation stays the global 1/B.
    Returns {"loss": float (of these rows), "E": (n, B) errors of these rows (columns prompts),
    "mode": str}.
    """
    B = _check_batch(x0, cond)
    check_chunk(chunk)
    if scale <= 0 or tau <= 0:
        raise ValueError(f"scale and tau must be positive, got scale={scale}, tau={tau}")
    t = step_t(t)
    dev = x0.device
    R = _check_rows(rows, B, dev)
    r = R.shape[0]
    n = r * B
    if chunk is None or chunk >= n:
        mode = "naive"
    elif two_pass or (two_pass is None and chunk < B):
        mode = "two_pass"
    elif chunk < B:
        raise ValueError(f"chunk={chunk} is smaller than one image row ({B} pairs): use two_pass=True")
    else:
        mode = "rows"
    if r == 0:  # more processes than images: this one has no rows
        return {"loss": 0.0, "E": torch.empty(0, B, device=dev), "mode": mode}
    z, u = forward_process(backend, x0[R], noise, t)  # local row a is image R[a]
    errors = lambda a, j: pair_mse(predict_pairs(backend, z, t, cond, tokens, a, j), u[a])  # noqa: E731
    loss_args = (scale, tau, dweight)

    if mode == "naive":
        a, prm = pair_grid(r, B, dev)
        E = to_matrix(errors(a, prm), r)
        loss = softrepa_row_losses(E, R, *loss_args).sum() / B
        (loss * grad_scale).backward()
        return {"loss": loss.item(), "E": E.detach(), "mode": mode}

    if mode == "rows":
        E = torch.empty(r, B, dtype=torch.float32, device=dev)
        per = chunk // B
        total = 0.0
        for a0 in range(0, r, per):
            a = torch.arange(a0, min(a0 + per, r), device=dev)
            e = errors(a.repeat_interleave(B), torch.arange(B, device=dev).repeat(len(a))).view(len(a), B)
            part = softrepa_row_losses(e, R[a], *loss_args).sum() / B
            (part * grad_scale).backward()
            E[a] = e.detach()
            total += part.item()
        return {"loss": total, "E": E, "mode": mode}

    # GradCache: errors without grad, closed-form dL/dE, then recompute chunks with grad.
    a, prm = pair_grid(r, B, dev)
    flat = torch.empty(n, dtype=torch.float32, device=dev)
    with torch.no_grad():
        for s in chunk_slices(n, chunk):
            flat[s] = errors(a[s], prm[s])
    E = to_matrix(flat, r)
    G = softrepa_loss_grad(E, *loss_args, labels=R, batch=B) * grad_scale
    for s in chunk_slices(n, chunk):
        (G[a[s], prm[s]] * errors(a[s], prm[s])).sum().backward()
    return {"loss": (softrepa_row_losses(E, R, *loss_args).sum() / B).item(), "E": E, "mode": mode}


# --- AGSM ----------------------------------------------------------------------------------

def agsm_targets(u: torch.Tensor, q: torch.Tensor, labels: torch.Tensor, gamma_pos: float = 1.0,
                 gamma_neg: float = 1.0, temp: float = 0.1):
    """AGSM's guided targets from EMA predictions (ALGORITHMS 3.2), all detached.

    u: (n_b, C, h, w) native targets; q: (n_b, n_p, C, h, w) EMA predictions for every
    prompt of each row; labels: (n_b,) index of the positive prompt per row.
    w = softmax_k(-mean((u - q_k)^2) / temp); delta = q - sum_k w_k q_k;
    y = u + gamma_pos * delta (positive) or u - gamma_neg * delta (negatives).
    Returns (y (n_b, n_p, C, h, w), w (n_b, n_p), delta (n_b, n_p, C, h, w)).
    """
    u, q = u.detach().float(), q.detach().float()
    n_b, n_p = q.shape[:2]
    r = -(u[:, None] - q).square().flatten(2).mean(2)
    w = torch.softmax(r / temp, dim=1)
    delta = q - torch.einsum("bp,bp...->b...", w, q)[:, None]
    pos = F.one_hot(labels.to(q.device), n_p).bool()
    g = torch.where(pos, torch.tensor(float(gamma_pos)), torch.tensor(-float(gamma_neg))).to(q)
    y = u[:, None] + g.view(n_b, n_p, *([1] * (q.ndim - 2))) * delta
    return y, w, delta


def agsm_step(backend, tokens: SoftTokens, ema_tokens: SoftTokens, x0: torch.Tensor, cond: dict, t,
              noise: torch.Tensor, *, gamma_pos: float = 1.0, gamma_neg: float = 1.0, temp: float = 0.1,
              chunk: int | None = None, nrows: int | None = None, grad_scale: float = 1.0,
              rows: torch.Tensor | None = None) -> dict:
    """One AGSM step: accumulate dL/dtokens; no optimizer step, no EMA update.

    Pair (i, j) uses psi+ (set 0) when j == i and psi- (set 1) otherwise, for both the online
    tokens and the EMA tokens (pitfall 16). The EMA pass runs first without grad; targets are
    detached. Loss per official row chunk of n_b rows (n_p = B prompts):
      (1/n_b) sum_pos mse + 1[gamma_neg > 0] / (n_b (n_p - 1)) sum_neg mse,
    summed over row chunks (ALGORITHMS 3.2). gamma_neg = 0 runs no online forward for negatives.

    nrows: official row chunks (AG:train.py), each with its own noise: noise must then be
    (ceil(B / nrows), C, h, w), one row per chunk. None = one row chunk (noise (1, C, h, w)),
    which is the official setting for SD1.5 and SD3 (nrows = B = 4); official SDXL uses
    nrows = 2. ``chunk`` (pairs per denoiser call) is memory only and never changes results.
    grad_scale multiplies the backpropagated loss (fp16 loss scaling), as in softrepa_step.
    rows: the image rows to evaluate (None = all B). Targets and weights are per image row, so
    rows split across processes give partial losses and gradients that sum to the batch's.
    Returns {"loss", "loss_pos", "loss_neg": float (of these rows), "w": (n, B) softmax weights,
    "E_ema": (n, B) EMA errors mean((u - q)^2), "wins": how many of these rows' positive weight
    beats every negative, "winrate": wins / n}.
    """
    B = _check_batch(x0, cond)
    check_chunk(chunk)
    if tokens.layout != ema_tokens.layout:
        raise ValueError("online and EMA tokens must share one layout")
    if len(tokens.layout.sets) != 2:
        raise ValueError(f"AGSM needs psi+ and psi- token sets; got a {tokens.layout.method} layout")
    if gamma_pos < 0 or gamma_neg < 0 or temp <= 0:
        raise ValueError(f"need gamma_pos >= 0, gamma_neg >= 0, temp > 0; got {gamma_pos}, {gamma_neg}, {temp}")
    nrows = B if nrows is None else nrows
    if isinstance(nrows, bool) or not isinstance(nrows, int) or nrows < 1:
        raise ValueError(f"nrows must be a positive int or None, got {nrows!r}")
    n_chunks = math.ceil(B / nrows)
    if noise.ndim != x0.ndim or noise.shape[0] != n_chunks or noise.shape[1:] != x0.shape[1:]:
        raise ValueError(f"noise must have shape ({n_chunks}, {', '.join(map(str, x0.shape[1:]))}): one noise "
                         f"per row chunk of {nrows} rows; got {tuple(noise.shape)}")
    t = step_t(t)
    dev = x0.device
    R = _check_rows(rows, B, dev)
    r = R.shape[0]
    if r == 0:  # more processes than images: this one has no rows
        empty = torch.empty(0, B, device=dev)
        return {"loss": 0.0, "loss_pos": 0.0, "loss_neg": 0.0, "w": empty, "E_ema": empty, "wins": 0,
                "winrate": float("nan")}
    row_chunk = torch.arange(B, device=dev) // nrows
    z, u = forward_process(backend, x0[R], noise.to(dev)[row_chunk[R]], t)  # local row a is image R[a]
    a, prm = pair_grid(r, B, dev)
    img = R[a]
    neg = (img != prm).long()  # polarity: 0 = psi+ on the matched prompt, 1 = psi- elsewhere

    # EMA predictions q (no grad) for every pair, then the detached targets.
    q = torch.empty((r * B,) + tuple(x0.shape[1:]), dtype=torch.float32, device=dev)
    with torch.no_grad():
        for s in chunk_slices(r * B, chunk):
            q[s] = predict_pairs(backend, z, t, cond, ema_tokens, a[s], prm[s], neg[s]).detach()
    q = q.view(B, r, *x0.shape[1:]).transpose(0, 1)  # prompt-major -> (row, prompt)
    y, w, _ = agsm_targets(u, q, R, gamma_pos, gamma_neg, temp)
    E_ema = (u[:, None] - q).square().flatten(2).mean(2)  # -reward, for diagnostics
    del q

    # Per-pair loss weights: 1/n_b for positives, 1/(n_b (n_p - 1)) for negatives.
    n_b = torch.bincount(row_chunk)[row_chunk].to(torch.float32)  # rows in image i's chunk
    weight = torch.where(neg.bool(), 1.0 / (n_b[img] * max(B - 1, 1)), 1.0 / n_b[img])
    online = torch.arange(r * B, device=dev) if gamma_neg > 0 else (neg == 0).nonzero()[:, 0]
    loss_pos = loss_neg = 0.0
    for s in chunk_slices(online.shape[0], chunk):
        k = online[s]
        p = predict_pairs(backend, z, t, cond, tokens, a[k], prm[k], neg[k])
        terms = weight[k] * pair_mse(p, y[a[k], prm[k]])
        (terms.sum() * grad_scale).backward()
        terms = terms.detach()
        loss_pos += terms[neg[k] == 0].sum().item()
        loss_neg += terms[neg[k] == 1].sum().item()
    diag = w.gather(1, R[:, None])[:, 0]
    off = w.masked_fill(F.one_hot(R, B).bool(), float("-inf")).amax(1)
    wins = int((diag > off).sum().item())
    return {"loss": loss_pos + loss_neg, "loss_pos": loss_pos, "loss_neg": loss_neg, "w": w, "E_ema": E_ema,
            "wins": wins, "winrate": wins / r}


# --- EMA tokens ----------------------------------------------------------------------------

def new_ema_tokens(layout: TokenLayout, generator: torch.Generator | None = None) -> SoftTokens:
    """AGSM's EMA tokens: an independent N(0, 0.02) draw (not a copy, ALGORITHMS 3.3), no grad."""
    return SoftTokens(layout, generator=generator).requires_grad_(False)


@torch.no_grad()
def ema_update(ema_tokens: SoftTokens, tokens: SoftTokens, decay: float = 0.9999) -> None:
    """ema <- decay * ema + (1 - decay) * tokens, over the token parameters only."""
    if ema_tokens.layout != tokens.layout:
        raise ValueError("EMA and online tokens must share one layout")
    if not 0.0 <= decay <= 1.0:
        raise ValueError(f"decay must be in [0, 1], got {decay}")
    src = dict(tokens.named_parameters())
    for name, p in ema_tokens.named_parameters():
        p.mul_(decay).add_(src[name].detach().to(p.dtype), alpha=1.0 - decay)


# --- checks --------------------------------------------------------------------------------

def _check_square(E: torch.Tensor) -> None:
    if E.ndim != 2 or E.shape[0] != E.shape[1]:
        raise ValueError(f"E must be a square (images x prompts) matrix, got {tuple(E.shape)}")


def _check_rows(rows, B: int, device) -> torch.Tensor:
    """The image rows to evaluate as a LongTensor on ``device`` (None: all B), checked."""
    if rows is None:
        return torch.arange(B, device=device)
    R = torch.as_tensor(rows).to(device=device, dtype=torch.long).reshape(-1)
    if R.numel() and (R.min() < 0 or R.max() >= B or R.unique().numel() != R.numel()):
        raise ValueError(f"rows must be distinct image indices in 0..{B - 1}, got {R.tolist()}")
    return R


def _check_batch(x0: torch.Tensor, cond: dict) -> int:
    if x0.ndim != 4:
        raise ValueError(f"x0 must be latents (B, C, h, w), got shape {tuple(x0.shape)}")
    B = x0.shape[0]
    if B < 2:
        raise ValueError(f"a contrastive step needs at least 2 images, got {B}")
    rows = {k: v.shape[0] for k, v in cond.items()}
    if any(r != B for r in rows.values()):
        raise ValueError(f"cond must hold one prompt per image ({B} rows), got {rows}")
    return B
