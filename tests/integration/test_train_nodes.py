"""The training nodes on real ComfyUI, in-process, with tiny SD1.5-, SD3- and Flux.1-class checkpoints built
under inference mode as a loader node builds them: dataset, encode, train, save, score, plot."""

import os

import numpy as np
import pytest
import torch
from PIL import Image

from pack_import import submodule

CAPTIONS = ["a red circle", "a blue square", "two green triangles", "a yellow star", "a red square",
            "a blue circle", "three red dots", "a green star", "a yellow circle", "a blue triangle",
            "a green square", "two yellow squares"]


@pytest.fixture(scope="module")
def nodes(comfy):
    return submodule("nodes.train_nodes")


@pytest.fixture(scope="module")
def mods(comfy):
    return {name: submodule(mod) for name, mod in {
        "loader": "nodes.loader_nodes", "paths": "nodes.paths", "formats": "training.formats",
        "run": "nodes.train_run", "data": "nodes.comfy_data", "ckpt": "training.checkpoint"}.items()}


@pytest.fixture
def dirs(comfy, mods, tmp_path, monkeypatch):
    """ComfyUI's input and models folders in tmp_path, as a fresh install would have them."""
    import folder_paths

    models = tmp_path / "models"
    monkeypatch.setattr(folder_paths, "models_dir", str(models))
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "soft_tokens", ([], set()))
    old_input = folder_paths.get_input_directory()
    folder_paths.set_input_directory(str(tmp_path / "input"))
    mods["paths"].register_folder()
    yield tmp_path
    folder_paths.set_input_directory(old_input)


def make_folder(root, name, n=12, size=64, bad_image=False, missing_caption=False):
    folder = root / "input" / name
    folder.mkdir(parents=True)
    g = np.random.default_rng(len(name))
    for i in range(n):
        arr = np.zeros((size, size, 3), dtype=np.uint8)
        arr[...] = g.integers(0, 255, 3)
        y, x = g.integers(0, size // 2, 2)
        arr[y:y + size // 3, x:x + size // 3] = g.integers(0, 255, 3)
        Image.fromarray(arr).save(folder / f"img{i:02d}.png")
        (folder / f"img{i:02d}.txt").write_text(CAPTIONS[i % len(CAPTIONS)])
    if bad_image:
        (folder / "broken.png").write_bytes(b"not a png at all")
        (folder / "broken.txt").write_text("a broken image")
    if missing_caption:
        Image.fromarray(np.zeros((size, size, 3), np.uint8)).save(folder / "nocap.png")
    return folder


def infer(fn, *args, **kwargs):
    """Run a node function the way ComfyUI's executor does: under inference mode."""
    with torch.inference_mode():
        return fn(*args, **kwargs)


def load_encode(nodes, ckpt, folder="data", resolution=64):
    images = infer(nodes.LoadCaptionedImages.execute, folder, resolution, "random")
    data = infer(nodes.EncodeSoftTokenDataset.execute, images.result[0], ckpt[1], ckpt[2])
    return images, data


TRAIN_DEFAULTS = dict(method="softrepa", steps=6, batch=2, chunk=0, learning_rate=0.01, tokens=4, blocks="",
                      time_table="official", init="official", tau=1.0, scale=4.0, gamma_pos=1.0, gamma_neg=-1.0,
                      ema_decay=0.9999, training_seed=7, precision="auto", gradient_checkpointing=False,
                      validation_fraction=0.34, validate_every=3, save_every=3, output_name="run", resume="none")


def train(nodes, model, dataset, **kw):
    return infer(nodes.TrainSoftTokens.execute, model, dataset, **{**TRAIN_DEFAULTS, **kw})


@pytest.fixture(scope="module")
def sd15(comfy):
    return comfy.tiny_checkpoint("sd15", seed=0)


@pytest.fixture(scope="module")
def sd3(comfy):
    return comfy.tiny_checkpoint("sd3", seed=0)


@pytest.fixture(scope="module")
def flux(comfy):
    """Flux.1 dev class: CLIP-L + T5 (cond (1, 256, 4096), pooled (1, 768)), 3 double blocks."""
    return comfy.tiny_flux_checkpoint(seed=0)


def test_dataset_skips_are_counted_and_encodings_cached(nodes, dirs, sd15):
    make_folder(dirs, "data", bad_image=True, missing_caption=True)
    images, data = load_encode(nodes, sd15)
    assert "1 unreadable image" in images.ui.as_dict()["text"][0]  # found when the folder is opened
    text = data.ui.as_dict()["text"][0]
    enc = data.result[0]
    assert enc.report["images"] == 12
    assert enc.report["skipped"] == {"missing caption": 1, "unreadable image": 1}
    assert "1 missing caption" in text and "1 unreadable image" in text
    assert enc.report["encoded"] == 12 and enc.report["from_cache"] == 0
    # a second run (e.g. after a restart) reads every latent from the on-disk cache
    _, again = load_encode(nodes, sd15)
    assert again.result[0].report["encoded"] == 0
    assert again.result[0].cache.stats["text_miss"] == 0


def test_folder_paths_cannot_escape_input(nodes, dirs, sd15, tmp_path):
    outside = tmp_path / "outside"
    outside.mkdir()
    (dirs / "input").mkdir(exist_ok=True)
    os.symlink(outside, dirs / "input" / "link")
    for bad in ("../outside", str(outside), "link"):
        msg = nodes.LoadCaptionedImages.validate_inputs(bad)
        assert isinstance(msg, str) and msg, bad
        with pytest.raises(ValueError):
            infer(nodes.LoadCaptionedImages.execute, bad, 64, "random")


def test_manifest_entries_outside_the_folder_are_skipped(nodes, dirs):
    folder = make_folder(dirs, "data", n=4)
    elsewhere = dirs / "elsewhere.png"
    Image.fromarray(np.zeros((64, 64, 3), np.uint8)).save(elsewhere)
    lines = [f'{{"image": "img0{i}.png", "caption": "a thing"}}' for i in range(4)]
    lines.append('{"image": "../../elsewhere.png", "caption": "escaped"}')
    (folder / "manifest.jsonl").write_text("\n".join(lines))
    ds = infer(nodes.LoadCaptionedImages.execute, "data", 64, "random").result[0]
    assert ds.n_images == 4
    assert ds.report()["skipped"] == {"image outside the dataset folder": 1}


def test_empty_dataset_is_an_error_before_encoding(nodes, dirs):
    (dirs / "input" / "empty").mkdir(parents=True)
    with pytest.raises(ValueError, match="empty"):
        infer(nodes.LoadCaptionedImages.execute, "empty", 64, "random")


def fixed_loss(comfy_mods, model, enc, tokens, ts=(200, 500, 800)):
    """SoftREPA loss (tau 1) of the training images at fixed t and noise: lower = better separation."""
    run = comfy_mods["run"]
    from soft_tokens_pack.nodes.comfy_backend import ComfyBackend
    from soft_tokens_pack.training.objectives import softrepa_loss
    from soft_tokens_pack.training.pairs import pair_errors

    backend = ComfyBackend(model, tokens)
    with backend.session(), torch.no_grad():
        x0, cond = run.val_pairs(enc, enc.dataset, 8, model.model.process_latent_in)
        g = torch.Generator().manual_seed(0)
        total = 0.0
        for t in ts:
            noise = torch.randn((1,) + tuple(x0.shape[1:]), generator=g)
            for s in range(0, 8, 2):
                E = pair_errors(backend, x0[s:s + 2], {k: v[s:s + 2] for k, v in cond.items()}, t, noise, tokens)
                total += softrepa_loss(E, tau=1.0).item()
    return total


@pytest.mark.parametrize("family", ["sd15", "sd3", "flux"])
def test_training_through_execute(comfy, nodes, mods, dirs, family, request):
    model, clip, vae = request.getfixturevalue(family)
    make_folder(dirs, "data")
    enc = load_encode(nodes, (model, clip, vae))[1].result[0]
    pos = torch.randn(1, 77, 768 if family == "sd15" else 4096, generator=torch.Generator().manual_seed(1))
    if family == "flux":
        assert enc.facts["context_length"] == 256 and enc.facts["pooled_width"] == 768  # T5 part, CLIP-L pooled
    neg = torch.zeros_like(pos)
    before = comfy.sample(model, pos, neg, steps=2)

    # tau 1 and lr 0.1: the tiny random models barely condition on text, so the official tau 0.07
    # gives almost no signal in a few steps.
    out = train(nodes, model, enc, steps=30, learning_rate=0.1, validate_every=15, save_every=15,
                blocks="" if family == "sd15" else "0-1")
    patched, tokens, history = out.result
    files = mods["ckpt"].RunFiles.of(os.path.join(mods["paths"].token_folder(), "run.safetensors"))
    assert all(p.is_file() for p in files.all())
    assert len(history["loss"]) == 30 and len(history["history"]["val"]) == 2
    assert "done at step 30" in out.ui.as_dict()["text"][0]
    # the training record is in the file
    assert tokens.meta["train_config"] and tokens.meta["base_model"].startswith(type(model.model).__name__)

    assert tokens.meta["steps"] == "30" and tokens.meta["status"] == "done" and "best" in tokens.meta["scores"]
    trainer_mod = submodule("training.trainer")
    init_tokens = trainer_mod.make_tokens(tokens.layout, torch.Generator().manual_seed(7),
                                          trainer_mod.bos_init(enc.cache.encoders.encode_text([""])["context"])
                                          if family == "sd15" else None)
    assert not torch.equal(tokens.static, init_tokens.static)
    if family != "flux":
        # Not asserted for the tiny Flux: its errors barely depend on the caption (E ~ 3.3 per element, spread
        # across captions ~0.1), so 30 steps do not measurably separate pairs (the fixed loss moves by ~1e-4 either
        # way); SoftREPA steps lowering the loss on Flux are tested at fixed t and noise in test_flux.py.
        assert fixed_loss(mods, model, enc, tokens) < fixed_loss(mods, model, enc, init_tokens)

    # the patched MODEL samples; the input MODEL is unchanged
    sampled = comfy.sample(patched, pos, neg, steps=2)
    assert torch.isfinite(sampled).all() and (sampled - before).abs().max() > 0
    assert torch.equal(comfy.sample(model, pos, neg, steps=2), before)


def test_save_then_load_round_trips_bit_exactly(nodes, mods, dirs, sd15):
    make_folder(dirs, "data")
    enc = load_encode(nodes, sd15)[1].result[0]
    tokens = train(nodes, sd15[0], enc, steps=2).result[1]
    out = infer(nodes.SaveSoftTokens.execute, tokens, "mine")
    assert "saved mine.safetensors" in out.ui.as_dict()["text"][0]
    # it shows in Load Soft Tokens' list without a restart, and a second save does not overwrite
    assert "mine.safetensors" in mods["paths"].list_token_files()
    infer(nodes.SaveSoftTokens.execute, tokens, "mine")
    assert "mine_001.safetensors" in mods["paths"].list_token_files()
    loaded = infer(mods["loader"].LoadSoftTokens.execute, sd15[0], "mine.safetensors", 1.0, "both").result[1]
    assert torch.equal(loaded.static, tokens.static) and torch.equal(loaded.time, tokens.time)
    assert loaded.layout == tokens.layout and loaded.meta == tokens.meta
    for bad in ("../escape", "/abs/path"):
        assert isinstance(nodes.SaveSoftTokens.validate_inputs(bad), str)


def test_resume_reproduces_the_uninterrupted_run(nodes, mods, dirs, sd15):
    make_folder(dirs, "data")
    enc = load_encode(nodes, sd15)[1].result[0]
    full = train(nodes, sd15[0], enc, steps=6, output_name="full").result[1]
    train(nodes, sd15[0], enc, steps=3, output_name="part")
    assert "part.ckpt.pt" in mods["paths"].list_checkpoints()
    resumed = train(nodes, sd15[0], enc, steps=6, resume="part.ckpt.pt").result[1]
    assert torch.equal(resumed.static, full.static) and torch.equal(resumed.time, full.time)
    with pytest.raises(ValueError, match="differ"):
        train(nodes, sd15[0], enc, steps=8, learning_rate=0.5, resume="part.ckpt.pt")


def test_interrupt_keeps_a_usable_partial_result(comfy, nodes, mods, dirs, sd15):
    """Cancel as the server does it: the progress hook raises once the interrupt flag is set."""
    import comfy.model_management as mm
    import comfy.utils

    make_folder(dirs, "data")
    enc = load_encode(nodes, sd15)[1].result[0]
    seen = []

    def hook(value, total, preview, node_id=None):
        seen.append(value)
        if value == 3:
            mm.interrupt_current_processing(True)  # the user pressed Cancel during step 4
        mm.throw_exception_if_processing_interrupted()

    old = comfy.utils.PROGRESS_BAR_HOOK
    comfy.utils.set_progress_bar_global_hook(hook)
    try:
        with pytest.raises(mm.InterruptProcessingException):
            train(nodes, sd15[0], enc, steps=50, save_every=0, output_name="cancel")
    finally:
        comfy.utils.set_progress_bar_global_hook(old)
        mm.interrupt_current_processing(False)
    files = mods["ckpt"].RunFiles.of(os.path.join(mods["paths"].token_folder(), "cancel.safetensors"))
    tokens = mods["formats"].load_tokens(files.out)
    state = mods["ckpt"].load_checkpoint(files.ckpt)
    assert state["step"] == 3 and max(seen) == 3
    assert "cancelled" in tokens.meta["train_config"]
    # and the run continues from there
    resumed = train(nodes, sd15[0], enc, steps=5, save_every=0, resume="cancel.ckpt.pt")
    assert "done at step 5" in resumed.ui.as_dict()["text"][0]


def test_plot_and_score_nodes(nodes, mods, dirs, sd15):
    make_folder(dirs, "data")
    enc = load_encode(nodes, sd15)[1].result[0]
    out = train(nodes, sd15[0], enc, steps=3)
    tokens, history = out.result[1], out.result[2]
    img = infer(nodes.PlotSoftTokenTraining.execute, history)
    image = img.result[0]
    assert image.ndim == 4 and image.shape[-1] == 3 and image.std() > 0.01
    score = infer(nodes.SoftTokenAlignmentScore.execute, sd15[0], tokens, enc, 8, 4, 0)
    text = score.result[0]
    assert "with tokens" in text and "without tokens" in text and "8 held-out pairs" in text


def test_bad_inputs_fail_before_heavy_work(nodes, mods, dirs, sd15, sd3, monkeypatch):
    make_folder(dirs, "data", n=6)
    enc15 = load_encode(nodes, sd15)[1].result[0]
    enc3 = load_encode(nodes, sd3)[1].result[0]
    run = mods["run"]
    calls = []
    monkeypatch.setattr(run, "train_on_model", lambda *a, **k: calls.append(a))
    folder = mods["paths"].token_folder()
    cases = [
        (dict(dataset=enc3), "encoded for another model"),
        (dict(batch=8, validation_fraction=0.0), "larger than the training set"),
        (dict(blocks="sideways"), "block groups"),
        (dict(validation_fraction=0.2), "validation needs at least"),
        (dict(resume="missing.ckpt.pt"), "not found"),
    ]
    for kw, msg in cases:
        with pytest.raises(ValueError, match=msg):
            train(nodes, sd15[0], kw.pop("dataset", enc15), **kw)
    assert not calls and not os.listdir(folder)
    # an unsupported sampling type
    import comfy.model_sampling as ms

    edm = sd15[0].clone()

    class EDMSampling(ms.ModelSamplingContinuousEDM, ms.EDM):
        pass

    edm.add_object_patch("model_sampling", EDMSampling(sd15[0].model.model_config))
    with pytest.raises(ValueError, match="epsilon, v-prediction and flow"):
        train(nodes, edm, enc15)
    assert not calls and not os.listdir(folder)
    assert isinstance(nodes.TrainSoftTokens.validate_inputs("../x", "none"), str)


@pytest.mark.parametrize("family", ["sd3", "flux"])
def test_agsm_trains_through_execute(nodes, mods, dirs, family, request):
    ckpt = request.getfixturevalue(family)
    make_folder(dirs, "data")
    enc = load_encode(nodes, ckpt)[1].result[0]
    out = train(nodes, ckpt[0], enc, method="agsm", steps=3, blocks="0-1", gradient_checkpointing=True)
    tokens = out.result[1]
    assert tokens.layout.method == "agsm" and tokens.static.shape[:2] == (2, 2)
    assert "done at step 3" in out.ui.as_dict()["text"][0]
