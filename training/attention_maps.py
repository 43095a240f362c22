"""Text->image attention maps and the losses of step-selected refinement (STEP_SELECTION.md 3-5).

Pure torch: the diffusers capture (``training/refine.py``) and the ComfyUI capture
(``nodes/refine_capture.py``) both hand their per-layer maps to these functions.

Vocabulary:
- an *attention map* ``A`` is (B, H, W, n) -- image positions x text positions -- already
  averaged over heads and layers (MMDiT: the image-query x text-key block of the joint softmax);
- a *stream* is one text encoder's run of columns inside A (CLIP; and T5 for SD3), with its
  renormalisation window and its subjects' token positions;
- a *subject map* is (B, S, H, W): per subject, the renormalised (and optionally smoothed) map,
  the mean over the subject's token pieces.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F

RENORM = 100.0  # Attend-and-Excite's token renormalisation: softmax(100 * A) over the window
LOSSES = ("cn", "iou", "cn+iou")


def attention_probs(q: torch.Tensor, k: torch.Tensor, scale: float, mask: torch.Tensor | None = None) -> torch.Tensor:
    """softmax(q k^T * scale [+ mask]) over keys, averaged over heads: (B, Nq, Nk), in fp32 or wider.

    q: (B, heads, Nq, d); k: (B, heads, Nk, d); mask: additive (or boolean keep-) mask that
    broadcasts to (B, heads, Nq, Nk).
    """
    dtype = torch.promote_types(q.dtype, torch.float32)  # fp16/bf16 models: softmax in fp32
    logits = torch.matmul(q.to(dtype), k.to(dtype).transpose(-1, -2)) * scale
    if mask is not None:
        if mask.dtype == torch.bool:
            logits = logits.masked_fill(~mask, -math.inf)
        else:
            logits = logits + mask.to(dtype)
    return logits.softmax(dim=-1).mean(dim=1)


@dataclass(frozen=True)
class Stream:
    """One text stream's place in the captured columns and its subjects.

    columns: (start, stop) of the stream inside the captured text columns.
    window: (start, stop) of the renormalisation window, relative to the stream's start
        (CLIP: drop BOS; SD1/SDXL keep EOT and padding but the last position, SD3 stops at EOT).
    subjects: per subject, the token positions (relative to the stream's start) whose maps are
        averaged; each inside the window.
    """

    columns: tuple
    window: tuple
    subjects: tuple

    def __post_init__(self):
        a, b = self.columns
        w0, w1 = self.window
        if not (0 <= a < b and 0 <= w0 < w1 <= b - a):
            raise ValueError(f"bad stream columns {self.columns} / window {self.window}")
        if not self.subjects:
            raise ValueError("a stream needs at least one subject")
        for pos in self.subjects:
            if not pos or not all(w0 <= p < w1 for p in pos):
                raise ValueError(f"subject positions {pos} fall outside the window {self.window}")


def smooth(maps: torch.Tensor, sigma: float = 0.5, size: int = 3) -> torch.Tensor:
    """Gaussian smoothing of (B, S, H, W) maps: reflect padding, a size x size kernel (A&E defaults)."""
    r = torch.arange(size, dtype=torch.float32, device=maps.device) - (size - 1) / 2
    g = torch.exp(-r ** 2 / (2 * sigma ** 2))
    kernel = (g[:, None] * g[None, :])
    kernel = (kernel / kernel.sum()).to(maps.dtype)
    b, s, h, w = maps.shape
    x = F.pad(maps.reshape(b * s, 1, h, w), (size // 2,) * 4, mode="reflect")
    return F.conv2d(x, kernel[None, None]).reshape(b, s, h, w)


def subject_maps(A: torch.Tensor, stream: Stream, smoothing: bool = True) -> torch.Tensor:
    """(B, S, H, W) subject maps of one stream from an attention map A (B, H, W, n)."""
    a0 = stream.columns[0]
    w0, w1 = stream.window
    window = (RENORM * A[..., a0 + w0:a0 + w1]).softmax(dim=-1)
    maps = torch.stack([window[..., [p - w0 for p in pos]].mean(dim=-1) for pos in stream.subjects], dim=1)
    return smooth(maps) if smoothing else maps


def cn_loss(maps: torch.Tensor) -> torch.Tensor:
    """Attend-and-Excite's neglect loss per image (B,): max over subjects of (1 - max_p M_s[p])^+."""
    peak = maps.flatten(2).amax(dim=2)
    return (1 - peak).clamp(min=0).amax(dim=1)


def iou_loss(maps: torch.Tensor) -> torch.Tensor:
    """Overlap of subject maps per image (B,): mean over pairs of sum(min) / sum(M_i + M_j); 0 for one subject."""
    s = maps.shape[1]
    if s < 2:
        return maps.new_zeros(maps.shape[0])
    flat = maps.flatten(2)
    pairs = [torch.minimum(flat[:, i], flat[:, j]).sum(1) / (flat[:, i] + flat[:, j]).sum(1)
             for i in range(s) for j in range(i + 1, s)]
    return torch.stack(pairs, dim=1).mean(dim=1)


def refinement_loss(stream_maps: list, loss: str = "cn+iou") -> dict:
    """Per-image losses from the subject maps of each stream (all with the same subjects).

    Several streams (SD3: CLIP and T5) are averaged map by map first (``average_t5_clip``).
    Returns {"loss", "cn", "iou"}, each (B,); "cn+iou" is their mean (the official IOUGSN).
    """
    if loss not in LOSSES:
        raise ValueError(f"loss must be one of {LOSSES}, got {loss!r}")
    maps = torch.stack(stream_maps).mean(dim=0) if len(stream_maps) > 1 else stream_maps[0]
    cn, iou = cn_loss(maps), iou_loss(maps)
    total = {"cn": cn, "iou": iou, "cn+iou": (cn + iou) / 2}[loss]
    return {"loss": total, "cn": cn, "iou": iou}


def step_size(i: int, n_steps: int, scale: float = 20.0, scale_range: tuple = (1.0, 0.5)) -> float:
    """alpha_i = scale * sqrt(linspace(r0, r1, n_steps)[i]) (Attend-and-Excite's schedule)."""
    if not 0 <= i < n_steps:
        raise ValueError(f"step {i} is outside a schedule of {n_steps} steps")
    r0, r1 = scale_range
    frac = r0 + (r1 - r0) * (i / (n_steps - 1) if n_steps > 1 else 0.0)
    return float(scale * math.sqrt(frac))


# --- subjects ---------------------------------------------------------------------------------

def parse_subjects(text: str) -> list:
    """Subjects from a comma- or newline-separated text ("cat, red dog"); ValueError when empty."""
    subjects = [s.strip() for s in re.split(r"[,\n;]", text or "") if s.strip()]
    if not subjects:
        raise ValueError("no subjects given: list the prompt's subject words, separated by commas (e.g. 'cat, dog')")
    return subjects


def _clean(piece: str) -> str:
    return piece.replace("</w>", "").replace("\u2581", "").lower()


def find_subject(pieces: list, subject: str, window: tuple) -> tuple:
    """Positions of the pieces that spell ``subject`` (its words in order) inside ``window``.

    ``pieces`` are the tokenizer's strings for the prompt (CLIP BPE with ``</w>`` word ends,
    SentencePiece with ``\u2581`` word starts, or whole words). The first match wins; a match
    must start at a word start and end at a word end. Returns () when not found.
    """
    target = re.sub(r"\s+", "", subject.lower())
    w0, w1 = window
    for start in range(w0, w1):
        if not _word_start(pieces, start, w0):
            continue
        text, pos = "", []
        for p in range(start, w1):
            text += _clean(pieces[p])
            pos.append(p)
            if not target.startswith(text):
                break
            if text == target and _word_end(pieces, p, w1):
                return tuple(pos)
    return ()


def _word_start(pieces, p, w0) -> bool:
    cur = pieces[p]
    if "\u2581" in cur or cur.startswith("<") or p == w0:
        return True
    prev = pieces[p - 1]
    return prev.endswith("</w>") or not any(m in prev + cur for m in ("</w>", "\u2581"))


def _word_end(pieces, p, w1) -> bool:
    cur = pieces[p]
    if cur.endswith("</w>") or p + 1 >= w1:
        return True
    nxt = pieces[p + 1]
    if nxt.startswith(("\u2581", "<")) or not nxt[:1].isalnum():  # next word, special token or punctuation
        return True
    return not any(m in cur + nxt for m in ("</w>", "\u2581"))


def subject_positions(pieces: list, subjects: list, window: tuple, stream_name: str = "prompt") -> tuple:
    """Positions of every subject (see ``find_subject``); ValueError naming the missing ones."""
    found = [find_subject(pieces, s, window) for s in subjects]
    missing = [s for s, pos in zip(subjects, found) if not pos]
    if missing:
        words = " ".join(_clean(p) for p in pieces[window[0]:window[1]] if _clean(p) and not p.startswith("<"))
        raise ValueError(f"subject(s) {missing} not found in the {stream_name} tokens ({words!r}); "
                         f"subjects must be words of the prompt")
    return tuple(found)


def batch_loss(A: torch.Tensor, streams: list, loss: str = "cn+iou", smoothing: bool = True) -> dict:
    """Per-image losses for a batch whose images have their own subjects.

    A: (B, H, W, n) attention maps; streams[b]: the list of ``Stream`` of image b (one per text
    stream, same subjects in each). Returns {"loss", "cn", "iou"}, each (B,).
    """
    if len(streams) != A.shape[0]:
        raise ValueError(f"{len(streams)} stream lists for a batch of {A.shape[0]}")
    rows = [refinement_loss([subject_maps(A[b:b + 1], s, smoothing) for s in image_streams], loss)
            for b, image_streams in enumerate(streams)]
    return {k: torch.cat([r[k] for r in rows]) for k in ("loss", "cn", "iou")}
