"""Datasets (folder with kohya repeats, JSONL, COCO), skips, transform, sampler, split, cache."""

import json
import os

import numpy as np
import pytest
import torch
from PIL import Image

from training.cache import EncodeCache
from training.datasets import (EMPTY_CAPTION, MISSING_CAPTION, MISSING_IMAGE, UNREADABLE_IMAGE,
                               load_image, open_dataset, split_dataset)
from training.encoders import Encoders


def write_image(path, w=12, h=10, seed=0):
    path.parent.mkdir(parents=True, exist_ok=True)
    arr = np.random.default_rng(seed).integers(0, 256, (h, w, 3), dtype=np.uint8)
    Image.fromarray(arr).save(path)
    return path


def write_pair(folder, name, caption, seed=0, ext=".png"):
    img = write_image(folder / f"{name}{ext}", seed=seed)
    if caption is not None:
        (folder / f"{name}.txt").write_text(caption, encoding="utf-8")
    return img


@pytest.fixture
def folder(tmp_path):
    root = tmp_path / "data"
    write_pair(root, "b", "a dog", seed=1)
    write_pair(root, "a", "a cat", seed=2)
    write_pair(root / "3_cats", "c", "three cats", seed=3, ext=".jpg")
    write_pair(root / "sub" / "deep", "d", "deep dog", seed=4)
    write_pair(root / ".hidden", "h", "hidden", seed=5)
    write_pair(root, "nocap", None, seed=6)
    write_pair(root, "emptycap", "  \n", seed=7)
    (root / "corrupt.png").write_bytes(b"\x89PNG\r\n\x1a\n" + os.urandom(64))
    (root / "corrupt.txt").write_text("a broken image")
    return root


def toy_text(prompts):
    return torch.stack([torch.full((3, 4), float(sum(map(ord, p)) % 97)) for p in prompts])


def counting_encoders(identity="toy-v1", calls=None):
    """Generic encoders: a deterministic text embedding, pixel-space latents; counts calls."""
    calls = calls if calls is not None else {"text": 0, "image": 0}

    def text_fn(prompts):
        calls["text"] += len(prompts)
        return toy_text(prompts)

    def image_fn(pixels):
        calls["image"] += len(pixels)
        return pixels[:, :, ::2, ::2] * 2

    return Encoders(text_fn, image_fn, identity=identity), calls


# --- sources and skips -------------------------------------------------------------------------

def test_folder_source_repeats_order_and_skips(folder):
    ds = open_dataset(folder, size=8)
    rel = [e.image.relative_to(folder).as_posix() for e in ds.entries]
    assert rel == ["3_cats/c.jpg", "a.png", "b.png", "sub/deep/d.png"]  # sorted, hidden folder ignored
    assert [e.repeats for e in ds.entries] == [3, 1, 1, 1]
    assert [e.captions for e in ds.entries] == [("three cats",), ("a cat",), ("a dog",), ("deep dog",)]
    assert len(ds) == 6 and ds.n_images == 4
    assert dict(ds.skipped) == {MISSING_CAPTION: 1, EMPTY_CAPTION: 1, UNREADABLE_IMAGE: 1}
    rep = ds.report()
    assert rep["images"] == 4 and rep["samples"] == 6 and rep["skipped_total"] == 3
    assert sorted(os.path.basename(p) for p, _ in ds.problems) == ["corrupt.png", "emptycap.png", "nocap.png"]
    line = ds.summary()
    assert "\n" not in line
    assert "4 images (6 samples with repeats)" in line
    assert "skipped 3 (1 empty caption, 1 missing caption, 1 unreadable image)" in line


def test_zero_repeat_folder_is_reported(tmp_path):
    write_pair(tmp_path / "0_reg", "x", "unused")
    write_pair(tmp_path / "2_a", "y", "used")
    ds = open_dataset(tmp_path, size=8)
    assert len(ds.entries) == 1 and len(ds) == 2
    assert ds.report()["skipped_total"] == 1


def test_jsonl_manifest(tmp_path):
    write_image(tmp_path / "img" / "one.png", seed=1)
    write_image(tmp_path / "img" / "two.png", seed=2)
    write_image(tmp_path / "img" / "three.png", seed=3)
    lines = [json.dumps({"image": "img/two.png", "caption": "second"}),
             json.dumps({"image": "img/one.png", "caption": ["first a", "", "first b"]}),
             "{not json",
             json.dumps({"image": "img/missing.png", "caption": "gone"}),
             json.dumps({"image": "img/three.png"}),
             ""]
    (tmp_path / "m.jsonl").write_text("\n".join(lines))
    ds = open_dataset(tmp_path / "m.jsonl", size=8)
    assert [e.image.name for e in ds.entries] == ["two.png", "one.png"]  # file order
    assert ds.entries[1].captions == ("first a", "first b")
    assert dict(ds.skipped) == {"bad manifest line": 1, MISSING_IMAGE: 1, MISSING_CAPTION: 1}


def make_coco(tmp_path, split="val2017"):
    ann_dir, img_dir = tmp_path / "coco" / "annotations", tmp_path / "coco" / split
    for i in (3, 1, 2, 4):
        write_image(img_dir / f"{i:012d}.jpg", seed=i)
    data = {"images": [{"id": i, "file_name": f"{i:012d}.jpg"} for i in (3, 1, 2, 4, 5)],
            "annotations": [{"image_id": 1, "id": 10, "caption": "one first"},
                            {"image_id": 3, "id": 11, "caption": "three first"},
                            {"image_id": 1, "id": 12, "caption": "one second"},
                            {"image_id": 1, "id": 13, "caption": "one third"},
                            {"image_id": 2, "id": 14, "caption": "two only"},
                            {"image_id": 5, "id": 15, "caption": "no file"}]}
    ann_dir.mkdir(parents=True)
    path = ann_dir / f"captions_{split}.json"
    path.write_text(json.dumps(data))
    return path


def test_coco_captions(tmp_path):
    path = make_coco(tmp_path)
    ds = open_dataset(path, size=8, caption_mode="first")  # image dir inferred: ../val2017
    assert [e.image.name for e in ds.entries] == ["000000000001.jpg", "000000000002.jpg", "000000000003.jpg"]
    assert ds.entries[0].captions == ("one first", "one second", "one third")  # annotation order
    assert dict(ds.skipped) == {MISSING_CAPTION: 1, MISSING_IMAGE: 1}  # id 4 no caption, id 5 no file
    batch = next(ds.batches(3, seed=0))
    assert {c for c in batch.captions} == {"one first", "two only", "three first"}
    # training mode: a random caption per access, reproducible from the seed
    train = open_dataset(path, size=8, image_dir=tmp_path / "coco" / "val2017")
    seen = {c for b, _ in zip(train.batches(1, seed=0), range(60)) for c in b.captions if c.startswith("one")}
    assert seen == {"one first", "one second", "one third"}


def test_open_errors(tmp_path):
    with pytest.raises(ValueError, match="does not exist"):
        open_dataset(tmp_path / "nope")
    (tmp_path / "x.csv").write_text("a,b")
    with pytest.raises(ValueError, match="unknown dataset type"):
        open_dataset(tmp_path / "x.csv")
    (tmp_path / "empty").mkdir()
    with pytest.raises(ValueError, match="empty"):
        open_dataset(tmp_path / "empty")
    write_pair(tmp_path / "allbad", "x", None)
    with pytest.raises(ValueError, match="no usable entries.*1 missing caption"):
        open_dataset(tmp_path / "allbad")
    (tmp_path / "notcoco.json").write_text(json.dumps({"foo": 1}))
    with pytest.raises(ValueError, match="not a COCO captions file"):
        open_dataset(tmp_path / "notcoco.json")
    with pytest.raises(ValueError, match="caption_mode"):
        open_dataset(tmp_path / "allbad", caption_mode="last")


def test_truncated_image_found_late_is_replaced(tmp_path):
    for i, name in enumerate("abcd"):
        write_pair(tmp_path, name, f"caption {name}", seed=i)
    data = (tmp_path / "b.png").read_bytes()
    (tmp_path / "b.png").write_bytes(data[: len(data) // 2])  # header intact, pixels cut off
    ds = open_dataset(tmp_path, size=8, verify="none")
    assert ds.n_images == 4 and not ds.skipped
    batch = next(b for b in ds.batches(2, seed=0) if 1 in b.entries)
    pixels, fixed = ds.load_pixels(batch)
    assert pixels.shape == (2, 3, 8, 8)
    assert 1 not in fixed.entries and fixed.entries[batch.entries.index(1)] == 2  # next readable entry
    assert fixed.captions == tuple(ds.entries[i].captions[0] for i in fixed.entries)
    assert dict(ds.skipped) == {UNREADABLE_IMAGE: 1} and ds.n_images == 3 and len(ds) == 3
    # a full check up-front finds it before training
    ds2 = open_dataset(tmp_path, size=8, verify="none")
    assert ds2.check_images("full")["skipped"] == {UNREADABLE_IMAGE: 1}


# --- transform -------------------------------------------------------------------------------

def test_resize_crop_matches_torchvision(tmp_path):
    tv = pytest.importorskip("torchvision.transforms")
    for k, (w, h) in enumerate([(37, 23), (23, 37), (16, 16), (9, 40)]):
        p = write_image(tmp_path / f"{k}.png", w, h, seed=k)
        ref = tv.Compose([tv.Resize(16, interpolation=tv.InterpolationMode.BICUBIC), tv.CenterCrop(16),
                          tv.ToTensor(), tv.Normalize([0.5], [0.5])])(Image.open(p).convert("RGB"))
        assert torch.equal(load_image(p, 16), ref)


def test_resize_crop_semantics(tmp_path):
    # wide image: left third black, middle white, right third black -> centre crop keeps the middle
    arr = np.zeros((10, 30, 3), dtype=np.uint8)
    arr[:, 10:20] = 255
    Image.fromarray(arr).save(tmp_path / "wide.png")
    x = load_image(tmp_path / "wide.png", 10)
    assert x.shape == (3, 10, 10) and x.dtype == torch.float32
    assert torch.all(x == 1.0)
    Image.fromarray(np.zeros((4, 4, 3), dtype=np.uint8)).save(tmp_path / "black.png")
    assert torch.all(load_image(tmp_path / "black.png", 4) == -1.0)
    Image.fromarray(np.zeros((6, 6), dtype=np.uint8), mode="L").save(tmp_path / "gray.png")
    assert load_image(tmp_path / "gray.png", 6).shape == (3, 6, 6)  # grayscale -> RGB


# --- sampler ---------------------------------------------------------------------------------

def test_batches_deterministic_resumable_and_epoch_permutation(folder):
    ds = open_dataset(folder, size=8)  # 6 samples (3 repeats of c.jpg)
    full = [b for b, _ in zip(ds.batches(4, seed=7), range(5))]
    again = [b for b, _ in zip(ds.batches(4, seed=7), range(5))]
    assert full == again
    assert [b for b, _ in zip(ds.batches(4, seed=7, start_step=3), range(2))] == full[3:]
    other = [b for b, _ in zip(ds.batches(4, seed=8), range(5))]
    assert [b.entries for b in other] != [b.entries for b in full]
    assert [(b.step, b.epoch) for b in full] == [(0, 0), (1, 1), (2, 2), (3, 3), (4, 4)]  # 6 // 4 = 1 step/epoch
    ds2 = open_dataset(folder, size=8)
    epochs = [b for b, _ in zip(ds2.batches(2, seed=1), range(6))]  # 3 steps per epoch, nothing dropped
    for e in range(2):
        got = sorted(i for b in epochs if b.epoch == e for i in b.entries)
        assert got == [0, 0, 0, 1, 2, 3]  # every sample once per epoch, repeats included
    assert all(b.captions == tuple(ds.entries[i].captions[0] for i in b.entries) for b in full)
    assert ds.steps_per_epoch(4) == 1 and ds.steps_per_epoch(4, drop_last=False) == 2
    with pytest.raises(ValueError, match="fewer than the batch size"):
        next(ds.batches(7))


def test_split(folder):
    ds = open_dataset(folder, size=8)
    train, val = split_dataset(ds, val_fraction=0.25, seed=3)
    train2, val2 = split_dataset(ds, val_fraction=0.25, seed=3)
    assert [e.image for e in val.entries] == [e.image for e in val2.entries]
    assert len(val.entries) == 1 and len(train.entries) == 3
    assert not {e.image for e in val.entries} & {e.image for e in train.entries}
    assert val.caption_mode == "first" and all(e.repeats == 1 for e in val.entries)
    assert split_dataset(ds, 0.0)[1] is None
    with pytest.raises(ValueError, match="val_fraction"):
        split_dataset(ds, 1.0)
    other = folder.parent / "valdir"
    write_pair(other / "5_x", "v", "val image")
    tr, va = split_dataset(ds, val_path=other)
    assert tr is ds and len(va) == 1 and va.caption_mode == "first" and va.size == 8


# --- cache -----------------------------------------------------------------------------------

def test_cache_hit_miss_and_invalidation(tmp_path, folder):
    ds = open_dataset(folder, size=8)
    enc, calls = counting_encoders()
    cache = EncodeCache(enc, root=tmp_path / "cache")
    batch = next(ds.batches(4, seed=0))
    x0, cond, b = cache.batch(ds, batch)
    assert b == batch and x0.shape == (4, 3, 4, 4) and cond["context"].shape == (4, 3, 4)
    pix, _ = ds.load_pixels(batch)
    assert torch.equal(x0, pix[:, :, ::2, ::2] * 2)
    assert torch.equal(cond["context"], toy_text(batch.captions))
    assert calls["image"] == 4  # duplicates of a repeated image are encoded per position, then cached
    cache.prepare(ds)  # the rest
    assert calls["text"] == 4  # one call per distinct caption
    n = dict(calls)

    # a fresh cache object on the same folder: all hits, no encoder calls
    cache2 = EncodeCache(enc, root=tmp_path / "cache")
    x0b, condb, _ = cache2.batch(ds, batch)
    assert torch.equal(x0b, x0) and torch.equal(condb["context"], cond["context"])
    cache2.batch(ds, _all_batch(ds))
    assert calls == n
    assert cache2.stats["latent_hit"] == 8 and cache2.stats["text_hit"] == 8 and not cache2.stats["latent_miss"]

    # changed caption -> that caption re-encoded; changed image -> re-encoded; nothing else
    (folder / "a.txt").write_text("a changed cat")
    img = folder / "b.png"
    write_image(img, seed=99)
    os.utime(img, ns=(img.stat().st_atime_ns, img.stat().st_mtime_ns + 10 ** 9))
    ds = open_dataset(folder, size=8)
    cache3 = EncodeCache(enc, root=tmp_path / "cache")
    x_all, cond_all, b_all = cache3.batch(ds, _all_batch(ds))
    assert calls["text"] - n["text"] == 1 and calls["image"] - n["image"] == 1
    assert torch.equal(x_all[2], load_image(img, 8)[:, ::2, ::2] * 2)  # b.png is entry 2
    assert b_all.captions[1] == "a changed cat"
    assert torch.equal(cond_all["context"], toy_text(b_all.captions))

    # another identity never reads these files
    other, ocalls = counting_encoders("toy-v2")
    c4 = EncodeCache(other, root=tmp_path / "cache")
    c4.batch(ds, batch)
    assert c4.stats["latent_hit"] == 0 and c4.stats["text_hit"] == 0 and ocalls["image"] == 4
    assert len(list((tmp_path / "cache").glob("latents-*"))) == 2


def _all_batch(ds):
    from training.datasets import Batch
    ent = tuple(range(len(ds.entries)))
    return Batch(0, 0, ent, (0,) * len(ent), tuple(ds.caption(i) for i in ent))


def test_cache_prepare_marks_bad_images_and_rewrites_corrupt_files(tmp_path):
    root = tmp_path / "d"
    for i, name in enumerate("abc"):
        write_pair(root, name, f"cap {name}", seed=i)
    data = (root / "c.png").read_bytes()
    (root / "c.png").write_bytes(data[: len(data) // 2])
    ds = open_dataset(root, size=8, verify="none")
    enc, calls = counting_encoders()
    cache = EncodeCache(enc, root=tmp_path / "cache")
    done = []
    out = cache.prepare(ds, batch_size=2, progress=lambda d, t: done.append((d, t)))
    assert out["dataset"]["skipped"] == {UNREADABLE_IMAGE: 1} and ds.n_images == 2
    assert done[-1] == (5, 5)  # 3 images + 2 captions of the good ones
    assert calls == {"image": 2, "text": 2}
    files = sorted((tmp_path / "cache").glob("latents-*/*/*.safetensors"))
    assert len(files) == 2
    files[0].write_bytes(b"garbage")
    cache2 = EncodeCache(enc, root=tmp_path / "cache")
    x0, _, _ = cache2.batch(ds, _all_batch_valid(ds))
    assert cache2.stats["corrupt"] == 1 and calls["image"] == 3
    cache3 = EncodeCache(enc, root=tmp_path / "cache")
    cache3.batch(ds, _all_batch_valid(ds))
    assert cache3.stats["latent_hit"] == 2 and cache3.stats.get("corrupt", 0) == 0


def _all_batch_valid(ds):
    from training.datasets import Batch
    ent = tuple(ds.valid())
    return Batch(0, 0, ent, (0,) * len(ent), tuple(ds.caption(i) for i in ent))


def test_cache_memory_mode_and_sampling_from_moments(tmp_path, folder):
    ds = open_dataset(folder, size=8)

    class Sampling(Encoders):
        def image_moments(self, pixels):
            return pixels * 0.5, torch.full_like(pixels, 0.1)

    enc = Sampling(lambda p: torch.zeros(len(p), 2, 3), identity="sampling-v1")
    enc.sample = True
    cache = EncodeCache(enc, root=None, text=False)
    batch = next(ds.batches(2, seed=0))
    a, cond, _ = cache.batch(ds, batch, generator=torch.Generator().manual_seed(5))
    b, _, _ = cache.batch(ds, batch, generator=torch.Generator().manual_seed(5))
    c, _, _ = cache.batch(ds, batch, generator=torch.Generator().manual_seed(6))
    assert torch.equal(a, b) and not torch.equal(a, c)  # fresh sample per access, seeded
    pix, _ = ds.load_pixels(batch)
    noise = torch.randn(pix.shape, generator=torch.Generator().manual_seed(5))
    assert torch.equal(a, pix * 0.5 + 0.1 * noise)
    assert cache.stats["latent_hit"] == 4 and cache.stats["text_miss"] == 6 and len(cache.memory) == 2
    assert cond["context"].shape == (2, 2, 3)
