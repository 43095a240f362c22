"""`python -m training train --ckpt FILE` through ComfyUI's loader writes the same tokens as the
Train Soft Tokens node on the same checkpoint file, data, settings and seed."""

import os
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from pack_import import REPO_ROOT, submodule


@pytest.fixture(scope="module")
def ckpt_file(comfy, tmp_path_factory):
    path = tmp_path_factory.mktemp("ckpt") / "tiny_sd15.safetensors"
    return comfy.save_tiny_checkpoint(str(path), "sd15", seed=0)


def make_data(folder, n=6):
    folder.mkdir(parents=True)
    g = np.random.default_rng(0)
    for i in range(n):
        Image.fromarray(g.integers(0, 255, (64, 64, 3), dtype=np.uint8)).save(folder / f"{i}.png")
        (folder / f"{i}.txt").write_text(["a red circle", "a blue square", "two green stars"][i % 3])


def test_cli_ckpt_equals_the_train_node(comfy, ckpt_file, tmp_path, monkeypatch):
    import folder_paths
    from comfy.sd import load_checkpoint_guess_config

    nodes = submodule("nodes.train_nodes")
    monkeypatch.setattr(folder_paths, "models_dir", str(tmp_path / "models"))
    monkeypatch.setitem(folder_paths.folder_names_and_paths, "soft_tokens", ([], set()))
    old_input = folder_paths.get_input_directory()
    folder_paths.set_input_directory(str(tmp_path / "input"))
    submodule("nodes.paths").register_folder()
    make_data(tmp_path / "input" / "data")
    try:
        with torch.inference_mode():  # as CheckpointLoaderSimple and the executor run
            model, clip, vae = load_checkpoint_guess_config(ckpt_file, output_vae=True, output_clip=True)[:3]
            images = nodes.LoadCaptionedImages.execute("data", 64, "random").result[0]
            data = nodes.EncodeSoftTokenDataset.execute(images, clip, vae).result[0]
            node_tokens = nodes.TrainSoftTokens.execute(
                model, data, method="softrepa", steps=3, batch=2, chunk=0, learning_rate=1e-3, tokens=4, blocks="",
                time_table="official", init="official", tau=0.07, scale=4.0, gamma_pos=1.0, gamma_neg=-1.0,
                ema_decay=0.9999, training_seed=7, precision="auto", gradient_checkpointing=False,
                validation_fraction=0.0, validate_every=500, save_every=500, output_name="node",
                resume="none").result[1]
    finally:
        folder_paths.set_input_directory(old_input)

    out = tmp_path / "cli.safetensors"
    env = dict(os.environ, COMFYUI_PATH=comfy.find_comfyui(), OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "training", "train", "--ckpt", ckpt_file, "--data", str(tmp_path / "input" / "data"),
           "--method", "softrepa", "--steps", "3", "--batch", "2", "--seed", "7", "--size", "64", "--out", str(out),
           "--no-progress"]
    proc = subprocess.run(cmd, cwd=REPO_ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "ComfyUI route" in proc.stdout
    cli_tokens = submodule("training.formats").load_tokens(out)
    assert cli_tokens.layout == node_tokens.layout
    assert torch.equal(cli_tokens.static, node_tokens.static) and torch.equal(cli_tokens.time, node_tokens.time)
    assert cli_tokens.meta["base_model"] == node_tokens.meta["base_model"]
