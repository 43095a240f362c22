"""The trainer: exact resume, NaN guard, output files, init, optimizer/scheduler, CLI errors.

A tiny random UNet (cross-attention width 32, 8x8 latents) through the real DiffusersBackend
and the real objectives; every run is a handful of steps.
"""

import json
import math

import pytest
import torch

from training.checkpoint import RunFiles, load_checkpoint, output_path
from training.cli import main as cli_main
from training.diffusers_backend import DiffusersBackend
from training.formats import load_tokens, train_config_of
from training.layouts import TokenLayout
from training.trainer import Cancelled, LossScaler, TensorData, TrainConfig, Trainer, bos_init, make_tokens

W = 32


def small_unet(seed=0):
    from diffusers import UNet2DConditionModel

    torch.manual_seed(seed)
    return UNet2DConditionModel(
        sample_size=8, in_channels=4, out_channels=4, layers_per_block=1, block_out_channels=(16, 32),
        norm_num_groups=8, attention_head_dim=8, down_block_types=("CrossAttnDownBlock2D",) * 2,
        up_block_types=("CrossAttnUpBlock2D",) * 2, cross_attention_dim=W)


@pytest.fixture(scope="module")
def backend():
    return DiffusersBackend(small_unet())


@pytest.fixture(scope="module")
def pairs():
    g = torch.Generator().manual_seed(5)
    return torch.randn(8, 4, 8, 8, generator=g), {"context": torch.randn(8, 6, W, generator=g)}


def layout(method):
    return TokenLayout(arch="sd15", method=method, n_tokens=2, width=W, text_width=W, blocks=("down", "mid"))


def config(method="softrepa", **kw):
    base = dict(method=method, steps=6, batch=4, lr=1e-2, val_every=2, ckpt_every=4, score_ts=(100, 600), seed=3)
    return TrainConfig(**{**base, **kw})


def make(backend, pairs, method, out, cfg=None, data=None, **kw):
    x0, cond = pairs
    val = (x0[:4], {k: v[:4] for k, v in cond.items()})
    return Trainer(backend, layout(method), data or TensorData(x0, cond, 4, seed=1), cfg or config(method), out,
                   val=val, progress=False, **kw)


def same_state(a: Trainer, b: Trainer):
    assert torch.equal(a.tokens.static, b.tokens.static)
    assert torch.equal(a.tokens.time, b.tokens.time)
    if a.ema is not None:
        assert torch.equal(a.ema.static, b.ema.static) and torch.equal(a.ema.time, b.ema.time)
    sa, sb = a.opt.state_dict(), b.opt.state_dict()
    for k in sa["state"]:
        for name in ("exp_avg", "exp_avg_sq", "step"):
            assert torch.equal(sa["state"][k][name], sb["state"][k][name])
    assert a.sched.state_dict() == b.sched.state_dict()
    assert [r["loss"] for r in a.history["steps"]] == [r["loss"] for r in b.history["steps"]]
    assert a.history["val"] == b.history["val"]


@pytest.mark.parametrize("method", ["softrepa", "agsm"])
def test_resume_after_cancel_is_bit_identical(backend, pairs, method, tmp_path):
    full = make(backend, pairs, method, tmp_path / "full.safetensors")
    res = full.run()
    assert res.stopped == "done" and res.step == 6
    assert len({r["t"] for r in full.history["steps"]}) > 1  # t really is redrawn per step

    stop_at = 3
    part = make(backend, pairs, method, tmp_path / "part.safetensors",
                on_step=lambda step, total, loss, metrics: step < stop_at)
    res = part.run()
    assert (res.stopped, res.step) == ("cancelled", stop_at)
    partial = load_tokens(tmp_path / "part.safetensors")  # a partial result is saved on cancel
    assert train_config_of(partial)["status"] == "cancelled"
    assert torch.equal(partial.static, part.tokens.static)

    resumed = make(backend, pairs, method, tmp_path / "part.safetensors", resume=tmp_path / "part.ckpt.pt")
    assert resumed.step == stop_at
    assert resumed.run().stopped == "done"
    same_state(full, resumed)
    assert torch.equal(load_tokens(tmp_path / "part.safetensors").static, full.tokens.static)
    if method == "agsm":
        assert not torch.equal(full.ema.static, full.tokens.static)


def test_an_error_saves_the_last_completed_step_and_resumes_exactly(backend, pairs, tmp_path):
    full = make(backend, pairs, "softrepa", tmp_path / "full.safetensors")
    full.run()

    def crash(step, total, loss, metrics):
        if step == 5:
            raise RuntimeError("out of memory")

    with pytest.raises(RuntimeError, match="out of memory"):
        make(backend, pairs, "softrepa", tmp_path / "crash.safetensors", on_step=crash).run()
    assert load_checkpoint(tmp_path / "crash.ckpt.pt")["step"] == 5  # not only the periodic one at 4
    assert train_config_of(load_tokens(tmp_path / "crash.safetensors"))["status"] == "error"
    resumed = make(backend, pairs, "softrepa", tmp_path / "crash.safetensors", resume=tmp_path / "crash.ckpt.pt")
    resumed.run()
    same_state(full, resumed)


class FailingData(TensorData):
    """A data source that breaks at one step (mid-step, before any update)."""

    def __init__(self, x0, cond, fail_at):
        super().__init__(x0, cond, batch=4, seed=1)
        self.fail_at = fail_at

    def batch(self, step, generator=None):
        if step == self.fail_at:
            raise OSError("disk read failed")
        return super().batch(step, generator)


def test_an_error_inside_a_step_keeps_the_steps_before_it(backend, pairs, tmp_path):
    full = make(backend, pairs, "softrepa", tmp_path / "full.safetensors")
    full.run()
    t = make(backend, pairs, "softrepa", tmp_path / "e.safetensors", data=FailingData(*pairs, fail_at=3))
    with pytest.raises(OSError, match="disk read failed"):
        t.run()
    assert load_checkpoint(tmp_path / "e.ckpt.pt")["step"] == 3
    resumed = make(backend, pairs, "softrepa", tmp_path / "e.safetensors", resume=tmp_path / "e.ckpt.pt")
    resumed.run()
    same_state(full, resumed)


def test_cancelled_exception_and_longer_resume(backend, pairs, tmp_path):
    def cancel(step, total, loss, metrics):
        if step == 2:
            raise Cancelled()

    t = make(backend, pairs, "softrepa", tmp_path / "c.safetensors", on_step=cancel)
    assert (t.run().stopped, t.step) == ("cancelled", 2)
    # Resuming may extend the run (steps), but not change what decides the result.
    longer = make(backend, pairs, "softrepa", tmp_path / "c.safetensors", cfg=config(steps=8),
                  resume=tmp_path / "c.ckpt.pt")
    assert longer.run().step == 8
    with pytest.raises(ValueError, match="lr"):
        make(backend, pairs, "softrepa", tmp_path / "c.safetensors", cfg=config(steps=10, lr=1e-3),
             resume=tmp_path / "c.ckpt.pt")


class NaNAfter(TensorData):
    """Training data whose latents turn NaN from step ``bad_from`` on."""

    def __init__(self, x0, cond, bad_from):
        super().__init__(x0, cond, 4, seed=1)
        self.bad_from = bad_from

    def batch(self, step, generator=None):
        x0, cond = super().batch(step, generator)
        return (x0 * float("nan") if step >= self.bad_from else x0), cond


def test_nan_guard_keeps_last_good_tokens_and_stops(backend, pairs, tmp_path):
    x0, cond = pairs
    cfg = config(steps=20, max_bad_steps=3, ckpt_every=0)
    t = Trainer(backend, layout("softrepa"), NaNAfter(x0, cond, bad_from=3), cfg, tmp_path / "nan.safetensors",
                progress=False)
    res = t.run()
    assert (res.stopped, res.step, t.bad_total) == ("nan", 6, 3)
    assert [r["skipped"] for r in t.history["steps"]] == [False] * 3 + [True] * 3
    assert all(math.isfinite(r["loss"]) for r in t.history["steps"][:3])

    clean = Trainer(backend, layout("softrepa"), TensorData(x0, cond, 4, seed=1), config(steps=3, ckpt_every=0),
                    tmp_path / "clean.safetensors", progress=False)
    clean.run()
    assert torch.equal(t.tokens.static, clean.tokens.static) and torch.equal(t.tokens.time, clean.tokens.time)
    saved = load_tokens(tmp_path / "nan.safetensors")
    assert torch.equal(saved.static, clean.tokens.static)
    assert train_config_of(saved)["status"] == "nan"
    assert int(t.opt.state_dict()["state"][0]["step"]) == 3  # no optimizer step on the bad ones


def test_output_file_history_and_no_silent_overwrite(backend, pairs, tmp_path):
    out = tmp_path / "run" / "tok.safetensors"
    t = make(backend, pairs, "agsm", out, meta={"model": "tiny"})
    t.run()
    tok = load_tokens(out)
    assert tok.layout == layout("agsm")
    assert torch.equal(tok.static, t.tokens.static) and torch.equal(tok.time, t.tokens.time)
    cfg = train_config_of(tok)
    assert (cfg["method"], cfg["steps"], cfg["status"], cfg["model"]) == ("agsm", 6, "done", "tiny")
    assert cfg["gamma_neg"] == 1.0 and cfg["lr"] == 1e-2  # UNet default gamma- resolved
    files = RunFiles.of(out)
    assert load_tokens(files.best).layout == tok.layout
    hist = json.loads(files.history.read_text())
    assert len(hist["steps"]) == 6 and len(hist["val"]) == 3
    assert {"accuracy", "accuracy_base", "error"} <= set(hist["val"][0])
    with pytest.raises(FileExistsError, match="overwrite"):
        make(backend, pairs, "agsm", out)
    make(backend, pairs, "agsm", out, overwrite=True)


def test_optimizer_is_tokens_only_and_lr_steps_per_validation(backend, pairs, tmp_path):
    t = make(backend, pairs, "softrepa", tmp_path / "o.safetensors", cfg=config(steps=4, lr=1e-3))
    opt_params = [p for g in t.opt.param_groups for p in g["params"]]
    assert len(opt_params) == 2 and opt_params[0] is t.tokens.static and opt_params[1] is t.tokens.time
    g = t.opt.param_groups[0]
    assert (g["betas"], g["eps"], g["weight_decay"]) == ((0.9, 0.999), 1e-8, 1e-4)
    t.run()
    assert all(p.grad is None for p in backend.denoiser.parameters())
    lrs = [r["lr"] for r in t.history["steps"]]
    cawr = lambda e: 1e-5 + (1e-3 - 1e-5) * 0.5 * (1 + math.cos(math.pi * (e % 10) / 10))  # noqa: E731
    # CosineAnnealingWarmRestarts(T_0=10) steps once per validation interval (val_every=2).
    assert lrs == pytest.approx([cawr(0), cawr(1), cawr(1), cawr(2)], rel=1e-12)


def test_null_text_init_for_both_agsm_polarities_and_random_ema(backend, pairs, tmp_path):
    context = torch.randn(1, 6, W)
    t = make(backend, pairs, "agsm", tmp_path / "i.safetensors", init_static=bos_init(context))
    row = context[0, 0]
    assert torch.equal(t.tokens.static, row.expand(2, 1, 2, W))  # every token, both sets
    assert 0.015 < t.tokens.time.std() < 0.025 and 0.015 < t.ema.static.std() < 0.025
    with pytest.raises(ValueError, match="broadcast"):
        make_tokens(layout("softrepa"), torch.Generator(), torch.zeros(3, W))


def test_bad_config_and_paths():
    with pytest.raises(ValueError, match="method"):
        TrainConfig(method="dpo").check()
    with pytest.raises(ValueError, match="batch"):
        TrainConfig(batch=1).check()
    with pytest.raises(ValueError, match="t_min"):
        TrainConfig(t_min=500, t_max=400).check()
    with pytest.raises(ValueError, match="accum"):
        TrainConfig(accum=0).check()
    with pytest.raises(ValueError, match=".safetensors"):
        RunFiles.of("tokens.pt")
    for bad in ("../x", "/etc/x", "a/../../x"):
        with pytest.raises(ValueError):
            output_path("/tmp/models/soft_tokens", bad)
    assert output_path("/tmp/models/soft_tokens", "sub/run1").name == "run1.safetensors"


# --- CLI ------------------------------------------------------------------------------------

def test_cli_train_rejects_bad_input_before_loading(tmp_path, capsys):
    data = tmp_path / "data"
    data.mkdir()
    model = tmp_path / "model"
    model.mkdir()
    common = ["train", "--method", "softrepa", "--out", str(tmp_path / "t.safetensors")]
    assert cli_main(common + ["--model", str(tmp_path / "nope"), "--data", str(data)]) == 2
    assert "model folder" in capsys.readouterr().err
    assert cli_main(common + ["--model", str(model), "--data", str(data)]) == 2
    assert "model_index.json" in capsys.readouterr().err
    # An SD1.5 pipeline index without any weights: reaching the model loader would fail differently.
    (model / "model_index.json").write_text(json.dumps({"_class_name": "StableDiffusionPipeline",
                                                        "text_encoder": [], "unet": []}))
    assert cli_main(common + ["--model", str(model), "--data", str(tmp_path / "nodata")]) == 2
    assert "dataset" in capsys.readouterr().err
    assert cli_main(common + ["--model", str(model), "--data", str(data), "--batch", "1"]) == 2
    assert "batch" in capsys.readouterr().err
    assert cli_main(common + ["--model", str(model), "--data", str(data), "--blocks", "down,side"]) == 2
    assert "block groups" in capsys.readouterr().err
    assert cli_main(common + ["--model", str(model), "--data", str(data), "--tokens", "0"]) == 2
    assert "n_tokens" in capsys.readouterr().err
    (tmp_path / "t.safetensors").write_bytes(b"")
    assert cli_main(common + ["--model", str(model), "--data", str(data)]) == 2
    assert "--overwrite" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli_main(["train", "--method", "dpo", "--model", str(model), "--data", str(data), "--out", "x.safetensors"])


def test_cli_train_resume_and_score_on_a_tiny_pipeline(tmp_path, capsys):
    from test_encoders import build_pipeline

    pipe = build_pipeline(tmp_path / "pipe", "sd15")
    small_unet().save_pretrained(pipe / "unet")
    data = tmp_path / "data"
    data.mkdir()
    from PIL import Image

    g = torch.Generator().manual_seed(0)
    for i, cap in enumerate(["a cat", "a dog", "red dog", "a red cat", "cat on a dog", "dog on a cat"]):
        px = (torch.rand(16, 16, 3, generator=g) * 255).to(torch.uint8).numpy()
        Image.fromarray(px).save(data / f"img{i}.png")
        (data / f"img{i}.txt").write_text(cap)
    out = tmp_path / "out" / "cat.safetensors"
    args = ["train", "--model", str(pipe), "--data", str(data), "--method", "softrepa", "--out", str(out),
            "--steps", "2", "--batch", "2", "--size", "16", "--val-every", "2", "--val-fraction", "0.34",
            "--seed", "1", "--no-progress"]
    assert cli_main(args) == 0
    tok = load_tokens(out)
    assert tok.layout.blocks == ("down",) and tok.layout.arch == "sd15"  # official SoftREPA SD1.5 default
    assert train_config_of(tok)["steps_done"] == 2
    assert torch.equal(tok.static[0, 0, 0], tok.static[0, 0, 1])  # null-text init: identical rows
    assert cli_main(args) == 2  # exists, no --overwrite
    capsys.readouterr()
    resume = ["train", "--model", str(pipe), "--data", str(data), "--method", "softrepa", "--out", str(out),
              "--resume", str(RunFiles.of(out).ckpt), "--steps", "3", "--size", "16", "--val-fraction", "0.34",
              "--no-progress"]
    assert cli_main(resume) == 0
    assert train_config_of(load_tokens(out))["steps_done"] == 3
    assert cli_main(["score", "--model", str(pipe), "--data", str(data), "--tokens", str(out), "--limit", "4",
                     "--group", "2", "--ts", "100,900", "--size", "16"]) == 0
    text = capsys.readouterr().out
    assert "with tokens" in text and "without tokens" in text and "chance 0.500" in text


# --- fp16 loss scaling ------------------------------------------------------------------------

def _cos(a: torch.Tensor, b: torch.Tensor) -> float:
    """Cosine in float64 (F.cosine_similarity clamps the norm product at 1e-8: wrong for ~1e-9 gradients)."""
    a, b = a.double().flatten(), b.double().flatten()
    return float(a @ b / (a.norm() * b.norm()))


def _flat(params) -> torch.Tensor:
    return torch.cat([p.detach().flatten().clone() for p in params])


@pytest.fixture(scope="module")
def backend16():
    """The tiny UNet computing in fp16 (CPU autocast), as ``--dtype fp16`` runs it."""
    return DiffusersBackend(small_unet(), autocast_dtype="fp16")


class PoisonGrad(torch.autograd.Function):
    """Identity forward; a backward that is never finite (whatever the loss scale)."""

    @staticmethod
    def forward(ctx, x):
        return x.view_as(x)

    @staticmethod
    def backward(ctx, g):
        return g * float("inf")


class PoisonedBackend:
    """A backend whose predictions are fine but whose gradients are not (a broken backward)."""

    def __init__(self, inner):
        self.inner = inner

    def __getattr__(self, name):
        return getattr(self.inner, name)

    def predict(self, *args, **kwargs):
        out = self.inner.predict(*args, **kwargs)
        return PoisonGrad.apply(out) if out.requires_grad else out


def test_fp16_is_detected_from_the_backend(backend, backend16):
    from types import SimpleNamespace as NS

    from training.trainer import _computes_in_fp16

    assert backend16.compute_dtype == torch.float16 and backend.compute_dtype == torch.float32
    assert _computes_in_fp16(backend16) and not _computes_in_fp16(backend)
    assert not _computes_in_fp16(NS(compute_dtype=torch.bfloat16)) and not _computes_in_fp16(NS())
    fp16_weights = DiffusersBackend(small_unet().to(torch.float16))
    assert _computes_in_fp16(fp16_weights)  # fp16 weights, no autocast


def test_fp16_gradients_underflow_without_loss_scaling_and_train_with_it(backend, backend16, pairs, tmp_path):
    x0, cond = pairs
    tok = make_tokens(layout("softrepa"), torch.Generator().manual_seed(0))
    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1))
    batch = (x0[:4], {k: v[:4] for k, v in cond.items()})
    from training.objectives import softrepa_step

    # The issue: fp16 compute without loss scaling silently gives a zero token gradient.
    softrepa_step(backend16, tok, *batch, 500, noise)
    assert all(torch.equal(p.grad, torch.zeros_like(p.grad)) for p in (tok.static, tok.time))
    tok.zero_grad()
    softrepa_step(backend, tok, *batch, 500, noise)  # fp32: the gradient is there, just tiny
    g32 = _flat([tok.static.grad, tok.time.grad])
    assert 0 < g32.abs().max() < 1e-7  # far below fp16's smallest subnormal (6e-8) once spread out
    for k, at_least in ((16, 0.95), (20, 0.999)):  # at 2**16 a little of it is still subnormal in fp16
        tok.zero_grad()
        softrepa_step(backend16, tok, *batch, 500, noise, grad_scale=2.0 ** k)
        assert _cos(_flat([tok.static.grad, tok.time.grad]), g32) > at_least

    # Through the Trainer: the same first step in fp16 (scaled) and fp32 moves the tokens alike.
    cfg = config(steps=1, weight_decay=0.0, ckpt_every=0)
    runs = {}
    for name, b, scaler in (("fp32", backend, None), ("fp16", backend16, None),
                            ("fp16-2^20", backend16, LossScaler(init_scale=2.0 ** 20)),
                            ("fp16-unscaled", backend16, LossScaler(enabled=False))):
        t = make(b, pairs, "softrepa", tmp_path / f"{name}.safetensors", cfg=cfg, loss_scaler=scaler)
        before = _flat(t.params)
        rec = t.train_step()
        runs[name] = (t, rec, _flat(t.params) - before)
    t32, rec32, d32 = runs["fp32"]
    assert not t32.scaler.enabled and t32.scaler.scale == 1.0
    assert "scale" not in rec32 and "overflow" not in rec32  # fp32 records are as before
    t16, rec16, d16 = runs["fp16"]
    assert t16.scaler.enabled and (rec16["scale"], rec16["overflow"], rec16["skipped"]) == (2.0 ** 16, False, False)
    assert rec16["loss"] == pytest.approx(rec32["loss"], rel=1e-3)
    assert d16.abs().max() > 0 and _cos(d16, d32) > 0.99
    assert _cos(runs["fp16-2^20"][2], d32) > 0.999
    # Without scaling (as before this change) nothing is learned in fp16: the update is exactly zero.
    assert torch.equal(runs["fp16-unscaled"][2], torch.zeros_like(d16))


def test_fp16_overflow_halves_the_scale_and_is_not_a_bad_step(backend16, pairs, tmp_path):
    x0, cond = pairs
    # Scale 2**26 overflows this model's fp16 AGSM gradients (they stay finite from about 2**23 down).
    cfg = config("agsm", steps=7, max_bad_steps=1, ckpt_every=0)
    t = Trainer(backend16, layout("agsm"), TensorData(x0, cond, 4, seed=1), cfg, tmp_path / "o.safetensors",
                progress=False, loss_scaler=LossScaler(init_scale=2.0 ** 26, growth_interval=2))
    before = _flat(t.params)
    res = t.run()
    recs = t.history["steps"]
    assert (res.stopped, res.step, t.bad_total, t.bad_run) == ("done", 7, 0, 0)  # max_bad_steps=1 never hit
    assert recs[0]["overflow"] and recs[0]["skipped"] and math.isfinite(recs[0]["loss"])
    # GradScaler's rule: halve on an overflow, double after growth_interval good steps in a row.
    scale, good = 2.0 ** 26, 0
    for r in recs:
        assert r["scale"] == scale and r["skipped"] == r["overflow"] and math.isfinite(r["loss"])
        if r["overflow"]:
            scale, good = scale / 2, 0
        else:
            good += 1
            if good == 2:
                scale, good = scale * 2, 0
    assert t.scaler.scale == scale
    n_over = sum(r["overflow"] for r in recs)
    assert 1 <= n_over <= 5 and t.scaler.overflows == n_over
    assert int(t.opt.state_dict()["state"][0]["step"]) == 7 - n_over  # no update on an overflow
    assert not torch.equal(_flat(t.params), before)
    saved = train_config_of(load_tokens(tmp_path / "o.safetensors"))
    assert (saved["status"], saved["skipped_steps"], saved["overflow_steps"]) == ("done", 0, n_over)
    assert saved["loss_scale"] == scale


def test_fp16_a_non_finite_loss_still_stops_training(backend16, pairs, tmp_path):
    x0, cond = pairs
    cfg = config(steps=20, max_bad_steps=2, ckpt_every=0)
    t = Trainer(backend16, layout("softrepa"), NaNAfter(x0, cond, bad_from=2), cfg, tmp_path / "n.safetensors",
                progress=False)
    res = t.run()
    assert (res.stopped, res.step, t.bad_total) == ("nan", 4, 2)
    recs = t.history["steps"]
    assert [(r["skipped"], r["overflow"], r["loss"] is None) for r in recs] == \
        [(False, False, False)] * 2 + [(True, False, True)] * 2
    assert {r["scale"] for r in recs} == {2.0 ** 16} and t.scaler.scale == 2.0 ** 16  # not the scale's fault

    # Gradients that are not finite even unscaled: the scale backs off to 1, then the steps are bad.
    t = Trainer(PoisonedBackend(backend16), layout("softrepa"), TensorData(x0, cond, 4, seed=1), cfg,
                tmp_path / "p.safetensors", progress=False, loss_scaler=LossScaler(init_scale=4.0))
    res = t.run()
    assert (res.stopped, res.step, t.bad_total) == ("nan", 4, 2)
    assert [(r["scale"], r["overflow"]) for r in t.history["steps"]] == [(4.0, True), (2.0, True), (1.0, False),
                                                                         (1.0, False)]


@pytest.mark.parametrize("method,init", [("softrepa", 2.0 ** 41), ("agsm", 2.0 ** 25)])
def test_fp16_resume_with_loss_scaling_is_bit_identical(backend16, pairs, method, init, tmp_path):
    scaler = lambda: LossScaler(init_scale=init, growth_interval=2)  # noqa: E731  overflows, then grows
    full = make(backend16, pairs, method, tmp_path / "full.safetensors", loss_scaler=scaler())
    assert full.run().stopped == "done"
    recs = full.history["steps"]
    assert any(r["overflow"] for r in recs) and len({r["scale"] for r in recs}) > 1

    part = make(backend16, pairs, method, tmp_path / "part.safetensors", loss_scaler=scaler(),
                on_step=lambda step, total, loss, metrics: step < 3)
    assert part.run().step == 3
    ckpt = load_checkpoint(tmp_path / "part.ckpt.pt")
    assert ckpt["scaler"] == part.scaler.state_dict() and ckpt["scaler"]["scale"] != init
    resumed = make(backend16, pairs, method, tmp_path / "part.safetensors", resume=tmp_path / "part.ckpt.pt")
    assert resumed.scaler.state_dict() == part.scaler.state_dict()  # the checkpoint's, not a fresh one
    resumed.run()
    same_state(full, resumed)
    assert resumed.history["steps"] == full.history["steps"]  # scales and overflows included
    assert resumed.scaler.state_dict() == full.scaler.state_dict()


def test_fp16_checkpoint_without_scaler_state_still_resumes(backend, backend16, pairs, tmp_path):
    from training.checkpoint import save_checkpoint

    t = make(backend16, pairs, "softrepa", tmp_path / "a.safetensors", cfg=config(steps=2, ckpt_every=0),
             on_step=lambda step, total, loss, metrics: step < 1)
    t.run()
    state = load_checkpoint(tmp_path / "a.ckpt.pt")
    del state["scaler"]  # as written before loss scaling existed
    save_checkpoint(state, tmp_path / "a.ckpt.pt")
    resumed = make(backend16, pairs, "softrepa", tmp_path / "a.safetensors", cfg=config(steps=2, ckpt_every=0),
                   resume=tmp_path / "a.ckpt.pt")
    assert resumed.scaler.state_dict() == LossScaler().state_dict()  # the default state
    assert resumed.run().stopped == "done" and resumed.history["steps"][-1]["scale"] == 2.0 ** 16
    # An fp32 run saves a disabled scaler, and resuming it keeps scaling off.
    t = make(backend, pairs, "softrepa", tmp_path / "b.safetensors", cfg=config(steps=2, ckpt_every=0),
             on_step=lambda step, total, loss, metrics: step < 1)
    t.run()
    assert load_checkpoint(tmp_path / "b.ckpt.pt")["scaler"]["enabled"] is False
    resumed = make(backend, pairs, "softrepa", tmp_path / "b.safetensors", cfg=config(steps=2, ckpt_every=0),
                   resume=tmp_path / "b.ckpt.pt")
    resumed.run()
    assert not resumed.scaler.enabled and "scale" not in resumed.history["steps"][-1]


def test_loss_scaler_rules():
    s = LossScaler(growth_interval=3)
    assert s.scale == 2.0 ** 16 and LossScaler(enabled=False).scale == 1.0
    for overflow in (False, False, True, False, False, False):
        s.update(overflow)
    assert (s.scale, s.growth_tracker, s.overflows) == (2.0 ** 16, 0, 1)  # halved, then doubled after 3
    off = LossScaler(enabled=False)
    off.update(True)
    assert (off.scale, off.overflows) == (1.0, 0) and not off.can_back_off()
    low = LossScaler(init_scale=1.0)
    assert not low.can_back_off()
    with pytest.raises(ValueError):
        LossScaler(backoff_factor=1.0)


@pytest.fixture
def sigterm_stops():
    """SIGTERM handled as the torchrun CLI does (KeyboardInterrupt), restored afterwards."""
    import signal

    def stop(signum, frame):
        raise KeyboardInterrupt

    old = signal.signal(signal.SIGTERM, stop)
    yield signal.SIGTERM
    signal.signal(signal.SIGTERM, old)


def _signal_every_save(monkeypatch, sig):
    """Make every checkpoint save receive ``sig`` as it starts."""
    import signal

    import training.trainer as trainer_module

    real = trainer_module.save_checkpoint
    calls = []

    def save(state, path):
        calls.append(state["step"])
        signal.raise_signal(sig)
        return real(state, path)

    monkeypatch.setattr(trainer_module, "save_checkpoint", save)
    return calls


def test_a_stop_signal_during_a_save_lets_the_save_finish(backend, pairs, tmp_path, monkeypatch, sigterm_stops):
    calls = _signal_every_save(monkeypatch, sigterm_stops)
    res = make(backend, pairs, "softrepa", tmp_path / "s.safetensors", cfg=config(ckpt_every=2)).run()
    # the periodic save at step 2 completes, then the signal stops the run; the final save ignores it
    assert (res.stopped, res.step) == ("cancelled", 2) and calls == [2, 2]
    assert load_checkpoint(tmp_path / "s.ckpt.pt")["step"] == 2
    assert train_config_of(load_tokens(tmp_path / "s.safetensors"))["status"] == "cancelled"


def test_a_stop_signal_during_the_error_save_keeps_the_error(backend, pairs, tmp_path, monkeypatch, sigterm_stops):
    calls = _signal_every_save(monkeypatch, sigterm_stops)
    t = make(backend, pairs, "softrepa", tmp_path / "e.safetensors", data=FailingData(*pairs, fail_at=3))
    with pytest.raises(OSError, match="disk read failed"):  # not a KeyboardInterrupt from inside the save
        t.run()
    assert calls == [3] and load_checkpoint(tmp_path / "e.ckpt.pt")["step"] == 3
    assert train_config_of(load_tokens(tmp_path / "e.safetensors"))["status"] == "error"


def test_accum_averages_the_gradients_of_its_batches_and_resumes_exactly(backend, pairs, tmp_path, monkeypatch):
    import training.trainer as T

    calls, seen = [], []
    real = T.softrepa_step

    def recording(backend_, tokens, x0, cond, t, noise, **kw):
        calls.append((x0, cond, t, noise))
        return real(backend_, tokens, x0, cond, t, noise, **kw)

    class Indexed(TensorData):
        def batch(self, step, generator=None):
            seen.append(step)
            return super().batch(step, generator)

    monkeypatch.setattr(T, "softrepa_step", recording)
    x0, cond = pairs
    tr = make(backend, pairs, "softrepa", tmp_path / "a.safetensors", cfg=config(steps=1, accum=3),
              data=Indexed(x0, cond, 4, seed=1))
    start = [p.detach().clone() for p in tr.params]
    grads = []
    step = tr.opt.step
    monkeypatch.setattr(tr.opt, "step", lambda: (grads.append([p.grad.clone() for p in tr.params]), step()))
    rec = tr.train_step()
    assert seen == [0, 1, 2] and len(calls) == 3 and rec["t"] == [c[2] for c in calls]
    # the same three batches, t and noise, one at a time from the starting tokens: their mean gradient
    ref = make(backend, pairs, "softrepa", tmp_path / "b.safetensors", cfg=config(steps=1))
    with torch.no_grad():
        for p, s in zip(ref.params, start):
            p.copy_(s)
    expected = [torch.zeros_like(p) for p in ref.params]
    for xb, cb, t, noise in calls:
        ref.opt.zero_grad(set_to_none=True)
        real(backend, ref.tokens, xb, cb, t, noise)
        for e, p in zip(expected, ref.params):
            e += p.grad / 3
    for g, e in zip(grads[0], expected):
        assert torch.allclose(g, e, atol=1e-7, rtol=1e-5)

    # and a run with accum stops and resumes bit for bit
    monkeypatch.setattr(T, "softrepa_step", real)
    full = make(backend, pairs, "softrepa", tmp_path / "full.safetensors", cfg=config(accum=2))
    full.run()
    part = make(backend, pairs, "softrepa", tmp_path / "part.safetensors", cfg=config(accum=2),
                on_step=lambda step, total, loss, metrics: step < 3)
    part.run()
    resumed = make(backend, pairs, "softrepa", tmp_path / "part.safetensors", cfg=config(accum=2),
                   resume=tmp_path / "part.ckpt.pt")
    assert resumed.run().stopped == "done"
    same_state(full, resumed)
