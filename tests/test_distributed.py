"""Training on several processes: the exact global B x B objective across ranks (gloo on CPU).

- in one process: the row shares of a batch give partial gradients that sum to the batch's;
- real processes (torch.multiprocessing): 2 and 3 ranks train the same tokens as 1 process
  (<= 1e-5 relative), only rank 0 writes, a resumed distributed run reproduces the
  uninterrupted one, and a 2-rank checkpoint resumes on 1 process;
- real ``torchrun`` jobs through the command line: single node, two nodes on 127.0.0.1, bad
  input stopping every rank, and a killed rank ending the job with an intact checkpoint.
"""

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
import torch.multiprocessing as mp

from training.checkpoint import RunFiles, load_checkpoint
from training.cli import main as cli_main
from training.diffusers_backend import DiffusersBackend
from training.distributed import Dist, shutdown
from training.formats import load_tokens, train_config_of
from training.layouts import TokenLayout
from training.objectives import agsm_step, new_ema_tokens, softrepa_step
from training.tokens import SoftTokens
from training.trainer import TensorData, TrainConfig, Trainer

ROOT = Path(__file__).resolve().parents[1]
W = 32
TOL = 1e-5


def small_unet():
    from test_trainer import small_unet as build

    return build()


def pairs():
    g = torch.Generator().manual_seed(5)
    return torch.randn(8, 4, 8, 8, generator=g), {"context": torch.randn(8, 6, W, generator=g)}


def layout(method):
    return TokenLayout(arch="sd15", method=method, n_tokens=2, width=W, text_width=W, blocks=("down", "mid"))


def trainer(backend, method, out, **kw):
    x0, cond = pairs()
    cfg = TrainConfig(method=method, steps=5, batch=4, lr=1e-2, val_every=2, ckpt_every=0, score_ts=(100, 600),
                      seed=3, chunk=kw.pop("chunk", None))
    val = (x0[:8], {k: v[:8] for k, v in cond.items()})  # two groups of 4: split across ranks
    return Trainer(backend, layout(method), TensorData(x0, cond, 4, seed=1), cfg, out, val=val, progress=False, **kw)


def rel(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


def assert_same_tokens(a: SoftTokens, b: SoftTokens, tol=TOL):
    assert a.layout == b.layout
    for name, p in b.named_parameters():
        assert rel(dict(a.named_parameters())[name].detach(), p.detach()) <= tol, name


# --- row shares in one process -----------------------------------------------------------------
# In float64, so that the only difference left is rounding (fp32 kernels differ with the batch size).

def _grads(tok):
    return torch.cat([p.grad.reshape(-1) for p in (tok.static, tok.time)])


def _fp64_setup(method):
    backend = DiffusersBackend(small_unet().double())
    x0, cond = pairs()
    tok = SoftTokens(layout(method), generator=torch.Generator().manual_seed(0)).double()
    return backend, x0[:4].double(), {k: v[:4].double() for k, v in cond.items()}, tok


@pytest.mark.parametrize("chunk", [None, 4, 3], ids=["naive", "rows", "two_pass"])
@pytest.mark.parametrize("shares", [[[0, 1], [2, 3]], [[0, 1], [2], [3]]], ids=["2", "3"])
def test_softrepa_row_shares_sum_to_the_batch(chunk, shares):
    backend, x0, cond, tok = _fp64_setup("softrepa")
    noise = torch.randn(1, 4, 8, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    whole = softrepa_step(backend, tok, x0, cond, 400, noise, tau=0.5, chunk=chunk)
    g_whole = _grads(tok).clone()
    loss, g = 0.0, torch.zeros_like(g_whole)
    for rows in shares:
        tok.zero_grad(set_to_none=True)
        out = softrepa_step(backend, tok, x0, cond, 400, noise, tau=0.5, chunk=chunk, rows=torch.tensor(rows))
        assert out["E"].shape == (len(rows), 4)
        torch.testing.assert_close(out["E"], whole["E"][rows], rtol=1e-6, atol=0)  # E is kept in fp32
        loss += out["loss"]
        g += _grads(tok)
    assert loss == pytest.approx(whole["loss"], rel=1e-6)  # losses are taken in fp32 (pair_mse)
    assert rel(g, g_whole) <= 1e-6 and g_whole.abs().sum() > 0


@pytest.mark.parametrize("nrows,gamma_neg", [(None, 1.0), (2, 1.0), (None, 0.0)])
def test_agsm_row_shares_sum_to_the_batch(nrows, gamma_neg):
    backend, x0, cond, tok = _fp64_setup("agsm")
    n_noise = 1 if nrows is None else 4 // nrows
    noise = torch.randn(n_noise, 4, 8, 8, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    ema = new_ema_tokens(layout("agsm"), torch.Generator().manual_seed(2)).double()
    kw = dict(nrows=nrows, gamma_neg=gamma_neg, chunk=5)
    whole = agsm_step(backend, tok, ema, x0, cond, 300, noise, **kw)
    g_whole = _grads(tok).clone()
    sums = {"loss": 0.0, "loss_pos": 0.0, "loss_neg": 0.0, "wins": 0}
    g = torch.zeros_like(g_whole)
    for rows in ([0], [1, 2], [3]):
        tok.zero_grad(set_to_none=True)
        out = agsm_step(backend, tok, ema, x0, cond, 300, noise, rows=torch.tensor(rows), **kw)
        torch.testing.assert_close(out["w"], whole["w"][rows], rtol=1e-6, atol=1e-9)
        for k in sums:
            sums[k] += out[k]
        g += _grads(tok)
    for k in ("loss", "loss_pos", "loss_neg"):
        assert sums[k] == pytest.approx(whole[k], rel=1e-6)
    assert sums["wins"] == round(whole["winrate"] * 4)
    assert rel(g, g_whole) <= 1e-6 and g_whole.abs().sum() > 0


def test_rows_are_checked_and_shared_out():
    backend = DiffusersBackend(small_unet())
    x0, cond = pairs()
    tok = SoftTokens(layout("softrepa"))
    noise = torch.zeros(1, 4, 8, 8)
    for bad in ([0, 0], [8], [-1]):
        with pytest.raises(ValueError, match="distinct image indices"):
            softrepa_step(backend, tok, x0, cond, 10, noise, rows=torch.tensor(bad))
    shares = [Dist(r, 3).rows(8).tolist() for r in range(3)]
    assert shares == [[0, 1, 2], [3, 4, 5], [6, 7]]
    assert [list(Dist(r, 2).groups(5)) for r in range(2)] == [[0, 2, 4], [1, 3]]
    with pytest.raises(ValueError, match="bad"):
        Dist().agree(ValueError("bad"))  # one process: the error itself


# --- real processes ------------------------------------------------------------------------------

def _rank(rank: int, world: int, tmp: str, method: str):
    """One rank: a full 5-step run, and a run stopped after step 3 then resumed to 5."""
    torch.set_num_threads(1)
    torch.distributed.init_process_group("gloo", init_method=f"file://{tmp}/store-{method}", rank=rank,
                                         world_size=world)
    dist = Dist(rank, world, rank)
    out = Path(tmp) / method / f"rank{rank}"  # a folder per rank: only rank 0's may appear
    backend = DiffusersBackend(small_unet())
    trainer(backend, method, out / "full.safetensors", dist=dist).run()
    trainer(backend, method, out / "part.safetensors", dist=dist, on_step=lambda step, *a: step != 3).run()
    if dist.is_main:
        shutil.copy(out / "part.ckpt.pt", out / "step3.ckpt.pt")
    state = dist.broadcast(load_checkpoint(out / "part.ckpt.pt") if dist.is_main else None)
    trainer(backend, method, out / "part.safetensors", dist=dist, resume=state).run()
    shutdown()


@pytest.mark.parametrize("world", [2, 3])
def test_ranks_train_the_single_process_tokens(world, tmp_path):
    for method in ("softrepa", "agsm"):
        mp.spawn(_rank, args=(world, str(tmp_path), method), nprocs=world, join=True)
    backend = DiffusersBackend(small_unet())
    for method in ("softrepa", "agsm"):
        base = tmp_path / method
        assert sorted(p.name for p in base.iterdir()) == ["rank0"]  # only rank 0 wrote
        one = trainer(backend, method, tmp_path / f"one-{method}.safetensors").run()
        full = load_tokens(base / "rank0" / "full.safetensors")
        assert_same_tokens(full, one.tokens)
        assert train_config_of(full)["steps_done"] == 5
        hist = RunFiles.of(base / "rank0" / "full.safetensors").history.read_text()
        assert f'"world_size": {world}' in hist
        # validation split across ranks: the same accuracies as one process
        mine = load_checkpoint(base / "rank0" / "full.ckpt.pt")["history"]["val"]
        assert [v["accuracy"] for v in mine] == [v["accuracy"] for v in one.history["val"]]
        assert [v["error"] for v in mine] == pytest.approx([v["error"] for v in one.history["val"]], rel=1e-5)
        # stopped at 3 and resumed on the same ranks: the uninterrupted distributed run, bit for bit
        resumed = load_tokens(base / "rank0" / "part.safetensors")
        for name, p in full.named_parameters():
            assert torch.equal(p, dict(resumed.named_parameters())[name]), name
        # the 3-step checkpoint of `world` ranks resumed on one process
        again = trainer(backend, method, tmp_path / f"again-{method}.safetensors",
                        resume=base / "rank0" / "step3.ckpt.pt").run()
        assert again.step == 5
        assert_same_tokens(again.tokens, one.tokens)


# --- torchrun through the command line ----------------------------------------------------------

@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from PIL import Image
    from test_encoders import build_pipeline

    root = tmp_path_factory.mktemp("dist")
    pipe = build_pipeline(root / "pipe", "sd15")
    small_unet().save_pretrained(pipe / "unet")
    data = root / "data"
    data.mkdir()
    g = torch.Generator().manual_seed(0)
    for i in range(12):
        px = (torch.rand(16, 16, 3, generator=g) * 255).to(torch.uint8).numpy()
        Image.fromarray(px).save(data / f"img{i}.png")
        (data / f"img{i}.txt").write_text(f"{['a cat', 'a red dog', 'cat on a dog'][i % 3]} {i}")
    return pipe, data


def train_args(tiny, out, method="softrepa", steps=5, extra=()):
    pipe, data = tiny
    return ["train", "--model", str(pipe), "--data", str(data), "--method", method, "--out", str(out), "--steps",
            str(steps), "--batch", "4", "--size", "16", "--val-every", "2", "--val-fraction", "0.34", "--seed", "1",
            "--lr", "0.01", "--no-progress", *extra]


def torchrun(args, *launcher, env=None, **kw):
    cmd = [sys.executable, "-m", "torch.distributed.run", *launcher, "-m", "training", *args]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(ROOT), **(env or {})}
    return subprocess.Popen(cmd, cwd=ROOT, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, **kw)


def finish(proc, timeout=300):
    out, err = proc.communicate(timeout=timeout)
    return proc.returncode, out, err


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture(scope="module")
def one_process(tiny, tmp_path_factory):
    out = tmp_path_factory.mktemp("one") / "t.safetensors"
    assert cli_main(train_args(tiny, out)) == 0
    return load_tokens(out)


def test_torchrun_single_node_matches_one_process(tiny, one_process, tmp_path):
    out = tmp_path / "t.safetensors"
    code, stdout, err = finish(torchrun(train_args(tiny, out), "--standalone", "--nproc_per_node", "2"))
    assert code == 0, err
    assert "torchrun: 2 processes (gloo)" in stdout and stdout.count("done at step 5/5") == 1  # rank 0 reports
    assert_same_tokens(load_tokens(out), one_process)


def test_torchrun_two_nodes_form_one_job(tiny, one_process, tmp_path):
    out = tmp_path / "t.safetensors"
    launcher = ["--nnodes", "2", "--nproc_per_node", "1", "--rdzv_backend", "c10d", "--rdzv_id", "two-nodes",
                "--rdzv_endpoint", f"127.0.0.1:{free_port()}"]
    nodes = [torchrun(train_args(tiny, out), *launcher) for _ in range(2)]
    results = [finish(p) for p in nodes]
    assert all(code == 0 for code, _, _ in results), [err[-2000:] for _, _, err in results]
    assert sum("torchrun: 2 processes" in stdout for _, stdout, _ in results) == 1
    assert_same_tokens(load_tokens(out), one_process)


def test_torchrun_bad_input_stops_every_rank(tiny, tmp_path):
    out = tmp_path / "t.safetensors"
    out.write_bytes(b"")  # exists: only rank 0 checks it, every rank must stop at once
    t0 = time.time()
    code, _, err = finish(torchrun(train_args(tiny, out, extra=["--dist-timeout", "120"]), "--standalone",
                                   "--nproc_per_node", "2"), timeout=120)
    assert code != 0 and "--overwrite" in err and "rank 0:" in err
    assert time.time() - t0 < 60
    code, _, err = finish(torchrun(train_args(tiny, tmp_path / "u.safetensors", extra=["--device", "cpu:1"]),
                                   "--standalone", "--nproc_per_node", "2"), timeout=120)
    assert code != 0 and "LOCAL_RANK" in err


def _pids_with(marker: str, rank: str) -> list:
    found = []
    for p in Path("/proc").iterdir():
        try:
            env = (p / "environ").read_bytes().split(b"\0")
        except (OSError, ValueError):
            continue
        if f"SOFT_TOKENS_TEST={marker}".encode() in env and f"RANK={rank}".encode() in env:
            found.append(int(p.name))
    return found


@pytest.mark.skipif(not Path("/proc/self/environ").exists(), reason="finds the rank's process through /proc")
def test_a_killed_rank_ends_the_job_and_the_checkpoint_resumes(tiny, tmp_path):
    out = tmp_path / "t.safetensors"
    ckpt = RunFiles.of(out).ckpt
    marker = f"kill-{os.getpid()}"
    proc = torchrun(train_args(tiny, out, steps=100000, extra=["--ckpt-every", "1", "--dist-timeout", "60"]),
                    "--standalone", "--nproc_per_node", "2", env={"SOFT_TOKENS_TEST": marker})
    deadline = time.time() + 120
    while time.time() < deadline and not (ckpt.exists() and load_checkpoint(ckpt)["step"] >= 3):
        time.sleep(0.5)
    victims = _pids_with(marker, "1")
    assert len(victims) == 1, "rank 1's process not found"
    os.kill(victims[0], signal.SIGKILL)
    t0 = time.time()
    code, _, err = finish(proc, timeout=120)
    assert code != 0 and time.time() - t0 < 90
    assert "rank      : 1" in err and "SIGKILL" in err  # torchrun names the failed rank
    # and rank 0 says how to continue. This failed when torchrun's SIGTERM landed in rank 0's save after the
    # failed all-reduce and cut it short; saves now finish first (checkpoint.signals_held). On failure: all of stderr
    assert "rank 0" in err and "--resume" in err, err
    state = load_checkpoint(ckpt)  # intact and resumable
    step = state["step"]
    assert 3 <= step < 100000 and torch.isfinite(state["tokens"]["static"]).all()
    assert cli_main(train_args(tiny, out, steps=step + 2, extra=["--resume", str(ckpt)])) == 0
    assert train_config_of(load_tokens(out))["steps_done"] == step + 2
