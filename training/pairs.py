"""Memory-bounded evaluation of (image, prompt) pairs.

Both objectives run the denoiser on every pair of B images and P prompts. Pairs are indexed
prompt-major as in the official code: k = j * B + i for image i and prompt j (ALGORITHMS 2.1).
Evaluating them in chunks of at most ``chunk`` pairs bounds peak memory by the chunk, never
changes results, and is an implementation detail only (unlike AGSM's official row chunks,
which draw fresh noise; see objectives.agsm_step).
"""

from __future__ import annotations

import torch

from .backend import Cond, select_cond


def step_t(t) -> torch.Tensor:
    """The step's single timestep as a LongTensor (1,); accepts an int, a scalar or a (1,) tensor."""
    t = torch.as_tensor(t).reshape(-1)
    if t.numel() != 1:
        raise ValueError(f"one timestep per step is expected (ALGORITHMS 2.1), got {t.numel()}")
    if t.is_floating_point() and t.item() != int(t.item()):
        raise ValueError(f"training timesteps are integers 0..999, got {t.item()}")
    return t.long()


def pair_grid(n_img: int, n_prompt: int, device=None) -> tuple[torch.Tensor, torch.Tensor]:
    """(image, prompt) index of every pair in prompt-major order k = j * n_img + i."""
    k = torch.arange(n_img * n_prompt, device=device)
    return k % n_img, torch.div(k, n_img, rounding_mode="floor")


def to_matrix(values: torch.Tensor, n_img: int) -> torch.Tensor:
    """Per-pair values (n_img * P,) in prompt-major order -> (n_img, P): rows images, columns prompts."""
    return values.reshape(-1, n_img).T


def chunk_slices(n: int, chunk: int | None):
    """Consecutive slices of at most ``chunk`` items covering range(n) (None: one slice)."""
    if chunk is None or chunk >= n:
        return [slice(0, n)]
    return [slice(s, min(s + chunk, n)) for s in range(0, n, chunk)]


def check_chunk(chunk) -> None:
    if chunk is not None and (isinstance(chunk, bool) or not isinstance(chunk, int) or chunk < 1):
        raise ValueError(f"chunk must be a positive int (pairs per denoiser call) or None, got {chunk!r}")


def predict_pairs(backend, z: torch.Tensor, t: torch.Tensor, cond: Cond, tokens, img: torch.Tensor,
                  prm: torch.Tensor, set_index=0) -> torch.Tensor:
    """Predictions for the pairs (img[k], prm[k]) in one denoiser call, (len(img), C, h, w)."""
    n = img.shape[0]
    return backend.predict(z[img], t.to(z.device).expand(n), select_cond(cond, prm.to(_cond_device(cond))),
                           tokens, set_index)


def pair_mse(pred: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    """Per-pair mean squared error over C, h, w (a mean, not a sum; pitfall 3), in fp32."""
    return (pred.float() - target.float()).square().flatten(1).mean(1)


def pair_errors(backend, x0: torch.Tensor, cond: Cond, t, noise: torch.Tensor, tokens, chunk: int | None = None,
                set_index_fn=None) -> torch.Tensor:
    """E[i, j] = mean((target_i - pred(z_t^i, t, c_j))^2) for every image i and prompt j, no grad.

    x0: (B, C, h, w) latents; cond: P prompt rows; t: the shared timestep; noise: (1, C, h, w),
    shared by every pair; tokens: SoftTokens or None (plain model); chunk: pairs per denoiser
    call (None: all); set_index_fn(img, prm) -> set index (int or LongTensor per pair),
    default 0. Returns (B, P) in fp32.
    """
    check_chunk(chunk)
    t = step_t(t)
    n_img, n_prompt = x0.shape[0], _cond_rows(cond)
    z, u = forward_process(backend, x0, noise, t)
    img, prm = pair_grid(n_img, n_prompt, x0.device)
    errors = torch.empty(n_img * n_prompt, dtype=torch.float32, device=x0.device)
    with torch.no_grad():
        for s in chunk_slices(errors.shape[0], chunk):
            i, j = img[s], prm[s]
            set_index = 0 if set_index_fn is None else set_index_fn(i, j)
            errors[s] = pair_mse(predict_pairs(backend, z, t, cond, tokens, i, j, set_index), u[i])
    return to_matrix(errors, n_img)


def group_pair_errors(backend, x0: torch.Tensor, cond: Cond, t, noise: torch.Tensor, tokens, group: int,
                      chunk: int | None = None) -> torch.Tensor:
    """E[q, i, j] for consecutive groups of ``group`` images: image i and prompt j of group q, no grad.

    x0: (G * group, C, h, w) latents and cond: G * group prompt rows, group q being rows
    q * group ... (q + 1) * group - 1; noise: (G, C, h, w), one per group, shared by that group's
    pairs. Only pairs within a group are evaluated (prompt-major within each group, as
    ``pair_errors``), so with G = 1 this is ``pair_errors``; chunk: pairs per denoiser call
    (None: all G * group^2). Returns (G, group, group) in fp32.
    """
    check_chunk(chunk)
    t = step_t(t)
    n_groups = x0.shape[0] // group
    if x0.shape[0] != n_groups * group or noise.shape[0] != n_groups:
        raise ValueError(f"need whole groups of {group} images and one noise per group, got {x0.shape[0]} images "
                         f"and {noise.shape[0]} noises")
    z, u = forward_process(backend, x0, noise.repeat_interleave(group, dim=0), t)
    i, j = pair_grid(group, group, x0.device)
    offset = (torch.arange(n_groups, device=x0.device) * group)[:, None]
    img, prm = (offset + i).flatten(), (offset + j).flatten()
    errors = torch.empty(img.shape[0], dtype=torch.float32, device=x0.device)
    with torch.no_grad():
        for s in chunk_slices(errors.shape[0], chunk):
            errors[s] = pair_mse(predict_pairs(backend, z, t, cond, tokens, img[s], prm[s]), u[img[s]])
    return errors.view(n_groups, group, group).transpose(1, 2)


def forward_process(backend, x0: torch.Tensor, noise: torch.Tensor, t: torch.Tensor):
    """(z_t, target) for every image; noise (1 or B, C, h, w) is broadcast over the images."""
    if noise.ndim != x0.ndim or noise.shape[1:] != x0.shape[1:] or noise.shape[0] not in (1, x0.shape[0]):
        raise ValueError(f"noise must have shape (1, {', '.join(map(str, x0.shape[1:]))}), got {tuple(noise.shape)}")
    noise = noise.expand_as(x0)
    tb = t.to(x0.device).expand(x0.shape[0])
    return backend.noisy(x0, noise, tb), backend.target(x0, noise, tb)


def _cond_rows(cond: Cond) -> int:
    rows = {k: v.shape[0] for k, v in cond.items()}
    if not rows or len(set(rows.values())) != 1:
        raise ValueError(f"conditioning tensors must share one prompt batch size, got {rows}")
    return next(iter(rows.values()))


def _cond_device(cond: Cond):
    return next(iter(cond.values())).device
