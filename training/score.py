"""The alignment score: top-1 accuracy of the diffusion classifier on held-out pairs.

Held-out (image, caption) pairs are taken in consecutive groups of ``group`` pairs. For each
group and each fixed timestep t, every image is noised with one fixed noise tensor (drawn from
``seed``, shared by the group's images and prompts, as in training) and the denoising error of
every (image, caption) pair of the group is computed (``pairs.group_pair_errors``). An image counts
as correctly classified at t when its own caption gives the lowest error among the group's
captions. Accuracy is the mean over images and timesteps; chance is 1 / group.

The same groups, timesteps and noise are used with and without the tokens, so the two numbers
compare directly. Nothing here touches a global or training random generator.
"""

from __future__ import annotations

import torch

from .pairs import group_pair_errors

DEFAULT_TS = (100, 300, 500, 700, 900)


@torch.no_grad()
def alignment_score(backend, tokens, x0: torch.Tensor, cond: dict, *, group: int = 4, ts=DEFAULT_TS,
                    seed: int = 0, chunk: int | None = None, base: bool = True, dist=None) -> dict:
    """Diffusion-classifier accuracy of the matched captions, with ``tokens`` and (``base``) without.

    x0: (N, C, h, w) latents; cond: N caption rows (row i is image i's caption); pairs beyond the
    last full group are left out. tokens: SoftTokens (AGSM: psi+, the inference set) or None.
    Returns a dict with ``accuracy`` / ``error`` (with tokens, when given), ``accuracy_base`` /
    ``error_base`` (plain model, when ``base``), where error is the mean matched-pair error,
    ``per_t`` ({t: {accuracy, accuracy_base}}), ``pairs``, ``groups``, ``group``, ``chance``, ``ts``.
    chunk: pairs per denoiser call at most; None: one group (``group``^2 pairs) per call. A chunk of
    several groups' pairs packs whole groups into one call (faster for small models on a
    CPU), a smaller one splits a group; the pairs and noise are the same either way.
    dist: a ``training.distributed.Dist`` to split the groups across ranks (every rank draws every
    group's noise in order, scores its own groups, and the counts are summed); every rank
    returns the whole result.
    """
    n = x0.shape[0]
    rows = {k: v.shape[0] for k, v in cond.items()}
    if any(r != n for r in rows.values()):
        raise ValueError(f"cond must hold one caption per image ({n} rows), got {rows}")
    if group < 2:
        raise ValueError(f"group must be at least 2 candidates, got {group}")
    if n < group:
        raise ValueError(f"the score needs at least {group} image-caption pairs (one group), got {n}")
    ts = tuple(int(t) for t in ts)
    if not ts or any(not 0 <= t <= 999 for t in ts):
        raise ValueError(f"score timesteps must be integers in 0..999, got {ts}")
    if tokens is None and not base:
        raise ValueError("nothing to score: no tokens and base=False")

    dev = getattr(backend, "device", None)
    if dev is not None:
        x0, cond = x0.to(dev), {k: v.to(dev) for k, v in cond.items()}
    runs = {"": tokens} if tokens is not None else {}
    if base:
        runs["_base"] = None
    gen = torch.Generator().manual_seed(int(seed))
    n_groups = n // group
    labels = torch.arange(group)
    hits = {k: torch.zeros(len(ts)) for k in runs}
    err = {k: 0.0 for k in runs}
    mine = set(dist.groups(n_groups)) if dist is not None else None
    per_call = 1 if chunk is None else max(1, chunk // (group * group))  # whole groups packed into one call
    pending = []  # (group index, its noise per t) of groups drawn but not yet scored

    def score_pending():
        rows = torch.cat([torch.arange(g * group, (g + 1) * group) for g, _ in pending]).to(x0.device)
        xp, cp = x0[rows], {k: v[rows] for k, v in cond.items()}
        for i, t in enumerate(ts):
            noise = torch.cat([noises[i] for _, noises in pending])
            for key, tok in runs.items():
                E = group_pair_errors(backend, xp, cp, t, noise, tok, group, chunk).cpu()
                hits[key][i] += (E.argmin(dim=2) == labels).sum().item()
                err[key] += E.diagonal(dim1=1, dim2=2).sum().item()
        pending.clear()

    for g in range(n_groups):
        # one noise per (group, t), drawn in this order whatever is scored where, so results never depend on
        # chunk or on the number of ranks
        noises = [torch.randn((1,) + tuple(x0.shape[1:]), generator=gen).to(x0.device, x0.dtype) for _ in ts]
        if mine is not None and g not in mine:
            continue  # another rank's group
        pending.append((g, noises))
        if len(pending) == per_call:
            score_pending()
    if pending:
        score_pending()
    if dist is not None:  # one all-reduce: hits and errors of every run
        keys = list(runs)
        buf = torch.cat([torch.cat([hits[k].double(), torch.tensor([err[k]], dtype=torch.float64)]) for k in keys])
        buf = dist.all_reduce_sum_(buf.to(x0.device), what="the validation all-reduce").cpu()
        for n_k, k in enumerate(keys):
            part = buf[n_k * (len(ts) + 1):(n_k + 1) * (len(ts) + 1)]
            hits[k], err[k] = part[:-1].float(), part[-1].item()
    pairs = n_groups * group
    out = {"pairs": pairs, "groups": n_groups, "group": group, "chance": 1.0 / group, "ts": list(ts)}
    for key in runs:
        out["accuracy" + key] = hits[key].sum().item() / (pairs * len(ts))
        out["error" + key] = err[key] / (pairs * len(ts))
    out["per_t"] = {t: {"accuracy" + key: hits[key][i].item() / pairs for key in runs} for i, t in enumerate(ts)}
    return out


def format_score(s: dict) -> str:
    """A short human-readable report of an ``alignment_score`` result."""
    lines = [f"alignment score on {s['pairs']} held-out pairs ({s['groups']} groups of {s['group']}, "
             f"chance {s['chance']:.3f}), t = {', '.join(map(str, s['ts']))}"]
    if "accuracy" in s:
        lines.append(f"  with tokens:    accuracy {s['accuracy']:.4f}   matched-pair error {s['error']:.5f}")
    if "accuracy_base" in s:
        lines.append(f"  without tokens: accuracy {s['accuracy_base']:.4f}   matched-pair error {s['error_base']:.5f}")
    for t, d in s["per_t"].items():
        lines.append(f"  t={t:<4d} " + "  ".join(f"{k} {v:.3f}" for k, v in d.items()))
    return "\n".join(lines)
