"""Captioned image datasets: sources, the official image transform, skips, a resumable sampler.

Sources (``open_dataset`` picks one from the path):
- a folder of images with same-name ``.txt`` captions, searched recursively. Kohya-style repeat
  folders ``N_name`` (e.g. ``10_cats/``) make each image in them count N times;
- a JSONL manifest, one ``{"image": path relative to the manifest, "caption": str or [str]}`` a line;
- a COCO captions JSON (``images`` + ``annotations``), images in ``image_dir`` or found next to it.

Every entry is an image with one or more captions. Training picks a random caption of an image
on each access, as the official COCO loader does; evaluation takes the first one
(``caption_mode="first"``, ALGORITHMS 7).

Images are resized (bicubic) so the shorter side is ``size``, center-cropped to size x size and
scaled to [-1, 1] (SR:train.py L50-58, the torchvision transform, reproduced with PIL so that
``training/`` needs no torchvision).

Bad entries never crash training. Missing or empty captions and unreadable images found when the
dataset is opened are skipped and counted by reason (``skipped``, ``report()``, ``summary()``).
An image that only fails later (a truncated file decodes its header fine) is marked bad when it is
loaded, counted, and replaced in its batch by the next readable entry.

Order is deterministic (folder: sorted relative paths; JSONL: file order; COCO: image id order) and
``batches(batch_size, seed, start_step)`` derives every batch from (seed, epoch), so a resumed run
continues with exactly the batches the interrupted one would have seen.
"""

from __future__ import annotations

import hashlib
import json
import re
from collections import Counter
from dataclasses import dataclass, replace
from pathlib import Path

import torch

IMAGE_EXTS = (".png", ".jpg", ".jpeg", ".webp", ".bmp", ".tif", ".tiff")
CAPTION_MODES = ("random", "first")
VERIFY_MODES = ("none", "header", "full")
REPEAT_DIR = re.compile(r"^(\d+)_(.+)$")
TRANSFORM = "bicubic-shorter-side+center-crop+[-1,1]"  # part of the latent cache key

# skip reasons
MISSING_CAPTION = "missing caption"
EMPTY_CAPTION = "empty caption"
UNREADABLE_CAPTION = "unreadable caption"
MISSING_IMAGE = "missing image file"
UNREADABLE_IMAGE = "unreadable image"
BAD_LINE = "bad manifest line"
ZERO_REPEATS = "in a 0_ repeat folder"


@dataclass(frozen=True)
class Entry:
    """One image with its captions; ``repeats`` = how many samples it counts as per epoch."""
    image: Path
    captions: tuple
    repeats: int = 1


@dataclass(frozen=True)
class Batch:
    """One training step's samples: entry indices, per-sample random draws, chosen captions."""
    step: int
    epoch: int
    entries: tuple
    draws: tuple
    captions: tuple


# --- the image transform -------------------------------------------------------------------

def load_image(path, size: int, exif_transpose: bool = True) -> torch.Tensor:
    """(3, size, size) float32 in [-1, 1]: bicubic resize of the shorter side, center crop.

    Matches torchvision ``Resize(size, BICUBIC), CenterCrop(size), ToTensor(), Normalize(.5, .5)``
    on PIL images. Raises (OSError, ValueError, ...) when the file cannot be decoded.
    """
    import numpy as np
    from PIL import Image, ImageOps

    with Image.open(path) as img:
        if exif_transpose:
            img = ImageOps.exif_transpose(img)
        img = img.convert("RGB")
    w, h = img.size
    if w <= h:
        nw, nh = size, int(size * h / w)
    else:
        nw, nh = int(size * w / h), size
    if (nw, nh) != (w, h):
        img = img.resize((nw, nh), Image.BICUBIC)
    top, left = int(round((nh - size) / 2.0)), int(round((nw - size) / 2.0))
    img = img.crop((left, top, left + size, top + size))
    x = torch.from_numpy(np.asarray(img, dtype=np.uint8).copy()).permute(2, 0, 1)
    return (x.float().div(255) - 0.5) / 0.5


def check_image(path, verify: str) -> str | None:
    """None if the image passes the check ("none", "header" = PIL verify, "full" = decode), else a reason."""
    if verify == "none":
        return None
    from PIL import Image

    try:
        with Image.open(path) as img:
            if verify == "header":
                img.verify()
            else:
                img.load()
    except FileNotFoundError:
        return MISSING_IMAGE
    except Exception:  # PIL raises many types for damaged files
        return UNREADABLE_IMAGE
    return None


# --- the dataset ---------------------------------------------------------------------------

class CaptionDataset:
    """Captioned images with skip accounting and a deterministic, resumable batch sampler."""

    def __init__(self, entries, size: int = 512, caption_mode: str = "random", source: str = "",
                 skipped=None, problems=None, exif_transpose: bool = True):
        if caption_mode not in CAPTION_MODES:
            raise ValueError(f"caption_mode must be one of {CAPTION_MODES}, got {caption_mode!r}")
        if int(size) < 8:
            raise ValueError(f"image size must be at least 8 pixels, got {size}")
        self.entries = list(entries)
        self.size = int(size)
        self.caption_mode = caption_mode
        self.source = source
        self.skipped = Counter(skipped or {})
        self.problems = list(problems or [])  # (path, reason) of every skipped item
        self.exif_transpose = exif_transpose
        self.bad = set()  # entry indices found unreadable after opening

    # sizes and lookup
    def __len__(self) -> int:
        """Number of samples per epoch (repeats included, bad entries excluded)."""
        return sum(e.repeats for i, e in enumerate(self.entries) if i not in self.bad)

    @property
    def n_images(self) -> int:
        return len(self.entries) - len(self.bad)

    def valid(self) -> list:
        """Indices of usable entries, in dataset order."""
        return [i for i in range(len(self.entries)) if i not in self.bad]

    def caption(self, index: int, draw: int = 0) -> str:
        """The caption of entry ``index`` for a random ``draw`` (first caption in "first" mode)."""
        caps = self.entries[index].captions
        return caps[0] if self.caption_mode == "first" else caps[draw % len(caps)]

    def pixels(self, index: int) -> torch.Tensor | None:
        """The transformed image of entry ``index``, or None (counted, entry marked bad) if unreadable."""
        entry = self.entries[index]
        try:
            return load_image(entry.image, self.size, self.exif_transpose)
        except FileNotFoundError:
            self.mark_bad(index, MISSING_IMAGE)
        except Exception:
            self.mark_bad(index, UNREADABLE_IMAGE)
        return None

    def mark_bad(self, index: int, reason: str = UNREADABLE_IMAGE):
        """Exclude entry ``index`` from now on and count it under ``reason``."""
        if index not in self.bad:
            self.bad.add(index)
            self.skipped[reason] += 1
            self.problems.append((str(self.entries[index].image), reason))

    def substitute(self, index: int) -> int:
        """The next usable entry after ``index`` (wrapping): the stand-in for an unreadable image."""
        n = len(self.entries)
        for k in range(1, n + 1):
            j = (index + k) % n
            if j not in self.bad:
                return j
        raise ValueError(f"no readable images left in {self.source}: {self.summary()}")

    def load_entry(self, index: int) -> tuple:
        """(index, pixels) of entry ``index``, or of its ``substitute`` chain if it is unreadable."""
        img = self.pixels(index) if index not in self.bad else None
        while img is None:
            index = self.substitute(index)
            img = self.pixels(index)
        return index, img

    def load_pixels(self, batch: Batch) -> tuple:
        """(pixels (B,3,S,S), batch) with unreadable images replaced by ``substitute`` (and captions to match)."""
        loaded = [self.load_entry(i) for i in batch.entries]
        return torch.stack([img for _, img in loaded]), self.rebatch(batch, [i for i, _ in loaded])

    def rebatch(self, batch: Batch, entries) -> Batch:
        """``batch`` with entries replaced (captions re-chosen with the same draws)."""
        entries = tuple(int(e) for e in entries)
        if entries == batch.entries:
            return batch
        caps = tuple(self.caption(e, d) for e, d in zip(entries, batch.draws))
        return replace(batch, entries=entries, captions=caps)

    def check_images(self, verify: str = "full", progress=None) -> dict:
        """Check every usable image now ("header" or "full" decode); bad ones are marked. Returns report()."""
        if verify not in VERIFY_MODES:
            raise ValueError(f"verify must be one of {VERIFY_MODES}, got {verify!r}")
        todo = self.valid()
        for k, i in enumerate(todo):
            reason = check_image(self.entries[i].image, verify)
            if reason:
                self.mark_bad(i, reason)
            if progress:
                progress(k + 1, len(todo))
        return self.report()

    # sampler
    def steps_per_epoch(self, batch_size: int, drop_last: bool = True) -> int:
        n = len(self)
        return n // batch_size if drop_last else -(-n // batch_size)

    def batches(self, batch_size: int, seed: int = 0, start_step: int = 0, drop_last: bool = True):
        """Endless iterator of ``Batch`` from step ``start_step`` on.

        Epoch e shuffles the samples (entries expanded by their repeats) with a permutation drawn
        from (seed, e), together with one random draw per sample that picks its caption. Step s is
        batch s mod steps_per_epoch of epoch s // steps_per_epoch, so resuming at any step gives the
        same batches. With ``drop_last`` (the official loaders) the last partial batch is dropped.
        The usable entries are fixed when the iterator starts.
        """
        if batch_size < 1:
            raise ValueError(f"batch size must be at least 1, got {batch_size}")
        if start_step < 0:
            raise ValueError(f"start_step must be >= 0, got {start_step}")
        samples = torch.tensor([i for i in self.valid() for _ in range(self.entries[i].repeats)],
                               dtype=torch.long)
        n = len(samples)
        spe = n // batch_size if drop_last else -(-n // batch_size)
        if spe == 0:
            raise ValueError(f"{self.source}: {n} sample(s) is fewer than the batch size {batch_size}")
        step = start_step
        while True:
            epoch = step // spe
            gen = torch.Generator().manual_seed(_epoch_seed(seed, epoch))
            perm = torch.randperm(n, generator=gen)
            draws = torch.randint(0, 2 ** 31 - 1, (n,), generator=gen)
            while step // spe == epoch:
                sl = perm[(step % spe) * batch_size:(step % spe + 1) * batch_size]
                ent = tuple(samples[sl].tolist())
                drw = tuple(draws[sl].tolist())
                yield Batch(step, epoch, ent, drw, tuple(self.caption(e, d) for e, d in zip(ent, drw)))
                step += 1

    # views
    def subset(self, indices, caption_mode: str | None = None, repeats: int | None = None,
               source: str | None = None) -> "CaptionDataset":
        """A dataset of the given entries (skip counts are kept; ``repeats`` overrides each entry's)."""
        entries = [self.entries[i] for i in indices]
        if repeats is not None:
            entries = [replace(e, repeats=repeats) for e in entries]
        return CaptionDataset(entries, self.size, caption_mode or self.caption_mode, source or self.source,
                              self.skipped, self.problems, self.exif_transpose)

    # reporting
    def report(self) -> dict:
        """Counts: images, samples, and skipped items by reason."""
        return {"source": self.source, "images": self.n_images, "samples": len(self),
                "skipped": dict(self.skipped), "skipped_total": sum(self.skipped.values())}

    def summary(self) -> str:
        """One line, e.g. ``photos: 120 images (1200 samples with repeats); skipped 3 (2 missing caption, ...)``."""
        n, s = self.n_images, len(self)
        text = f"{self.source}: {n} image{'s' * (n != 1)}"
        if s != n:
            text += f" ({s} samples with repeats)"
        total = sum(self.skipped.values())
        if total:
            parts = ", ".join(f"{c} {r}" for r, c in sorted(self.skipped.items()) if c)
            text += f"; skipped {total} ({parts})"
        else:
            text += "; nothing skipped"
        return text

    def __repr__(self) -> str:
        return f"CaptionDataset({self.summary()})"


def _epoch_seed(seed: int, epoch: int) -> int:
    return int.from_bytes(hashlib.sha256(f"{int(seed)}:{int(epoch)}".encode()).digest()[:7], "little")


# --- opening sources -----------------------------------------------------------------------

def open_dataset(path, size: int = 512, caption_mode: str = "random", verify: str = "header",
                 image_dir=None, caption_ext: str = ".txt", exif_transpose: bool = True) -> CaptionDataset:
    """Open a folder, a ``.jsonl`` manifest or a COCO captions ``.json`` as a CaptionDataset.

    ``verify`` = "header" (default: PIL verify of every image while opening), "full" (decode every
    image) or "none". ``image_dir`` is the COCO image folder (default: found next to the JSON).
    Raises ValueError for a missing path, an unknown type, or a source with no usable entries.
    """
    if caption_mode not in CAPTION_MODES:
        raise ValueError(f"caption_mode must be one of {CAPTION_MODES}, got {caption_mode!r}")
    if verify not in VERIFY_MODES:
        raise ValueError(f"verify must be one of {VERIFY_MODES}, got {verify!r}")
    path = Path(path).expanduser()
    if not path.exists():
        raise ValueError(f"dataset path {path} does not exist; give a folder of images with .txt captions, "
                         f"a .jsonl manifest or a COCO captions .json")
    if path.is_dir():
        entries, problems = _scan_folder(path, caption_ext)
    elif path.suffix.lower() == ".jsonl":
        entries, problems = _scan_jsonl(path)
    elif path.suffix.lower() == ".json":
        entries, problems = _scan_coco(path, image_dir)
    else:
        raise ValueError(f"unknown dataset type {path.name!r}: expected a folder, a .jsonl manifest "
                         f"or a COCO captions .json")
    if not entries and not problems:
        raise ValueError(f"dataset {path} is empty: no images with captions found")
    good = []
    for e in entries:
        reason = check_image(e.image, verify)
        if reason:
            problems.append((str(e.image), reason))
        else:
            good.append(e)
    skipped = Counter(r for _, r in problems)
    ds = CaptionDataset(good, size, caption_mode, str(path), skipped, problems, exif_transpose)
    if not good:
        raise ValueError(f"dataset {path} has no usable entries: {ds.summary()}")
    return ds


def _read_caption(path: Path):
    """(caption, None) or (None, reason)."""
    if not path.is_file():
        return None, MISSING_CAPTION
    try:
        text = path.read_text(encoding="utf-8").strip()
    except (OSError, UnicodeDecodeError):
        return None, UNREADABLE_CAPTION
    return (text, None) if text else (None, EMPTY_CAPTION)


def _repeats(rel: Path) -> int:
    """Repeat count from the nearest ``N_name`` folder of a path relative to the dataset root."""
    for part in reversed(rel.parts[:-1]):
        m = REPEAT_DIR.match(part)
        if m:
            return max(int(m.group(1)), 0)
    return 1


def _scan_folder(root: Path, caption_ext: str):
    entries, problems = [], []
    files = sorted((p for p in root.rglob("*") if p.suffix.lower() in IMAGE_EXTS and p.is_file()),
                   key=lambda p: p.relative_to(root).as_posix())
    for img in files:
        rel = img.relative_to(root)
        if any(part.startswith(".") for part in rel.parts):
            continue  # hidden files and folders (.ipynb_checkpoints, .cache, ...)
        text, reason = _read_caption(img.with_suffix(caption_ext))
        if reason:
            problems.append((str(img), reason))
            continue
        reps = _repeats(rel)
        if reps > 0:
            entries.append(Entry(img, (text,), reps))
        else:
            problems.append((str(img), ZERO_REPEATS))
    return entries, problems


def _captions_of(value):
    """Clean caption tuple from a str or a list of str (empty tuple if none usable)."""
    if isinstance(value, str):
        value = [value]
    if not isinstance(value, (list, tuple)):
        return ()
    return tuple(c.strip() for c in value if isinstance(c, str) and c.strip())


def _scan_jsonl(path: Path):
    entries, problems = [], []
    base = path.parent
    with open(path, encoding="utf-8") as f:
        for lineno, line in enumerate(f, 1):
            if not line.strip():
                continue
            try:
                row = json.loads(line)
                image = row["image"]
                if not isinstance(image, str) or not image:
                    raise TypeError
            except (ValueError, KeyError, TypeError):
                problems.append((f"{path}:{lineno}", BAD_LINE))
                continue
            img = (base / image) if not Path(image).is_absolute() else Path(image)
            if "caption" not in row:
                problems.append((str(img), MISSING_CAPTION))
                continue
            caps = _captions_of(row["caption"])
            if not caps:
                problems.append((str(img), EMPTY_CAPTION))
            elif not img.is_file():
                problems.append((str(img), MISSING_IMAGE))
            else:
                entries.append(Entry(img, caps))
    return entries, problems


def _scan_coco(path: Path, image_dir):
    try:
        data = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, ValueError) as e:
        raise ValueError(f"cannot read {path} as JSON: {e}") from None
    if not isinstance(data, dict) or "images" not in data or "annotations" not in data:
        raise ValueError(f"{path} is not a COCO captions file (needs 'images' and 'annotations')")
    images = sorted((im for im in data["images"] if isinstance(im, dict) and "id" in im and "file_name" in im),
                    key=lambda im: im["id"])
    if not images:
        raise ValueError(f"COCO file {path} lists no images")
    caps = {}
    for ann in data["annotations"]:  # file order = the order CocoCaptions returns them in
        if isinstance(ann, dict) and isinstance(ann.get("caption"), str) and ann["caption"].strip():
            caps.setdefault(ann.get("image_id"), []).append(ann["caption"].strip())
    folder = Path(image_dir).expanduser() if image_dir else _coco_image_dir(path, images)
    if not folder.is_dir():
        raise ValueError(f"COCO image folder {folder} does not exist")
    entries, problems = [], []
    for im in images:
        img = folder / im["file_name"]
        if im["id"] not in caps:
            problems.append((str(img), MISSING_CAPTION))
        elif not img.is_file():
            problems.append((str(img), MISSING_IMAGE))
        else:
            entries.append(Entry(img, tuple(caps[im["id"]])))
    return entries, problems


def _coco_image_dir(path: Path, images) -> Path:
    """Where the images of ``captions_<split>.json`` live: ``<split>/`` next to the file or its folder."""
    split = re.sub(r"^captions_", "", path.stem)
    here = path.parent
    candidates = [here / split, here.parent / split, here / "images" / split, here.parent / "images" / split,
                  here / "images", here.parent / "images", here, here.parent]
    probe = [im["file_name"] for im in images[:20]]
    for c in candidates:
        if c.is_dir() and any((c / f).is_file() for f in probe):
            return c
    raise ValueError(f"cannot find the images of {path.name}: looked for {probe[0]!r} in "
                     f"{', '.join(str(c) for c in candidates)}; pass image_dir")


# --- train / validation split --------------------------------------------------------------

def split_dataset(ds: CaptionDataset, val_fraction: float = 0.0, seed: int = 0, val_path=None,
                  **open_kwargs) -> tuple:
    """(train, val): a held-out fraction of the images, or a separate ``val_path`` dataset.

    Validation uses the first caption of each image, once (no repeats); None when there is none.
    The held-out images are chosen by ``seed``, independent of dataset order on disk.
    """
    if val_path is not None:
        val = open_dataset(val_path, **{"size": ds.size, **open_kwargs, "caption_mode": "first"})
        return ds, val.subset(range(len(val.entries)), repeats=1)
    if not 0.0 <= val_fraction < 1.0:
        raise ValueError(f"val_fraction must be in [0, 1), got {val_fraction}")
    valid = ds.valid()
    n_val = int(round(val_fraction * len(valid)))
    if val_fraction > 0 and n_val == 0:
        n_val = 1
    if n_val == 0:
        return ds, None
    if n_val >= len(valid):
        raise ValueError(f"val_fraction {val_fraction} leaves no training images out of {len(valid)}")
    gen = torch.Generator().manual_seed(_epoch_seed(seed, -1))
    chosen = sorted(valid[i] for i in torch.randperm(len(valid), generator=gen)[:n_val].tolist())
    rest = sorted(set(valid) - set(chosen))
    train = ds.subset(rest)
    val = ds.subset(chosen, caption_mode="first", repeats=1, source=f"{ds.source} (validation)")
    val.skipped, val.problems = Counter(), []
    return train, val
