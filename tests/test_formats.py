"""Token files: official imports (shapes, safety), our format's round trip, the CLI."""

import os
import pickle
import subprocess
import sys

import pytest
import torch

from training.formats import load_tokens, read_official, safe_torch_load, save_tokens, train_config_of
from training.layouts import TokenLayout
from training.tokens import SoftTokens

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.mark.parametrize("arch, static, time, blocks", [
    ("sd1.5", (1, 1, 4, 768), (100, 768), ("down",)),
    ("sdxl", (1, 1, 4, 2048), None, ("down", "mid")),
    ("sd3", (1, 5, 4, 1536), (100, 7680), (0, 1, 2, 3, 4)),
])
def test_official_files_load_with_right_shapes(reference_dir, arch, static, time, blocks):
    tok = load_tokens(reference_dir / arch)
    assert tuple(tok.static.shape) == static
    assert (None if tok.time is None else tuple(tok.time.shape)) == time
    assert tok.layout.blocks == blocks
    assert tok.layout.method == "softrepa"
    assert tok.static.dtype == torch.float32


def test_official_sd15_rows_are_identical(reference_dir):
    # ALGORITHMS 5.1: the released SD1.5 tokens are 4 bit-identical rows (null-text init).
    s = load_tokens(reference_dir / "sd1.5").static[0, 0]
    assert torch.equal(s, s[:1].expand_as(s))


def test_official_sd3_values_match_released_stats(reference_dir):
    tok = load_tokens(reference_dir / "sd3")
    assert abs(tok.static.mean().item() - (-0.00202)) < 5e-5
    assert abs(tok.static.std().item() - 0.1265) < 5e-4


def test_official_static_file_directly_and_block_override(reference_dir):
    tok = load_tokens(reference_dir / "sd1.5" / "dc_tokens.pth", blocks=("down", "mid"))
    assert tok.time is not None  # the sibling time table is picked up
    assert tok.layout.blocks == ("down", "mid")
    assert tok.meta["blocks_choice"] == "user override"


class Evil:
    def __reduce__(self):
        return (os.system, ("echo pwned > /tmp/soft_tokens_pwned",))


def test_malicious_pickle_is_refused(tmp_path):
    bad = tmp_path / "dc_tokens.pth"
    torch.save({"payload": Evil()}, bad)
    if os.path.exists("/tmp/soft_tokens_pwned"):
        os.unlink("/tmp/soft_tokens_pwned")
    with pytest.raises(ValueError, match="refused"):
        load_tokens(tmp_path)
    assert not os.path.exists("/tmp/soft_tokens_pwned")


def test_plain_pickle_is_refused(tmp_path):
    bad = tmp_path / "dc_tokens.pth"
    with open(bad, "wb") as f:
        pickle.dump(Evil(), f)
    with pytest.raises(ValueError, match="refused"):
        safe_torch_load(bad)


def test_unknown_shape_is_refused(tmp_path):
    torch.save(torch.zeros(3, 4, 5, 6, 7), tmp_path / "dc_tokens.pth")
    with pytest.raises(ValueError, match="not a known softrepa layout"):
        load_tokens(tmp_path)


def test_agsm_official_layout(tmp_path):
    torch.save(torch.nn.Parameter(torch.randn(2, 5, 4, 1536)), tmp_path / "soft_tokens.pth")
    torch.save(torch.nn.Embedding(100, 7680), tmp_path / "soft_t_tokens.pth")
    tok = load_tokens(tmp_path)
    assert tok.layout.method == "agsm" and tok.layout.position == "append"
    assert tuple(tok.static.shape) == (2, 5, 4, 1536)
    torch.save(torch.nn.Parameter(torch.randn(2, 4, 768)), tmp_path / "soft_tokens.pth")
    torch.save(torch.nn.Embedding(100, 768), tmp_path / "soft_t_tokens.pth")
    tok = load_tokens(tmp_path)
    assert tok.layout.arch == "sd15" and tok.layout.blocks == ("down", "mid")


def make_tokens(method="agsm", seed=0):
    lay = TokenLayout(arch="sd3", method=method, n_tokens=2, width=32, text_width=16, blocks=(0, 2))
    return SoftTokens(lay, generator=torch.Generator().manual_seed(seed), meta={"note": "x"})


def test_round_trip_is_exact(tmp_path):
    tok = make_tokens()
    path = save_tokens(tok, tmp_path / "t.safetensors", train_config={"lr": 1e-3, "steps": 10})
    back = load_tokens(path)
    assert back.layout == tok.layout
    assert torch.equal(back.static, tok.static) and torch.equal(back.time, tok.time)
    assert train_config_of(back) == {"lr": 1e-3, "steps": 10}
    assert back.meta["note"] == "x"
    # Saving what was loaded gives the same tensors and metadata again.
    again = load_tokens(save_tokens(back, tmp_path / "u.safetensors"))
    assert torch.equal(again.static, tok.static) and again.meta == back.meta


def test_save_refuses_overwrite_when_asked(tmp_path):
    p = save_tokens(make_tokens(), tmp_path / "t.safetensors")
    with pytest.raises(FileExistsError):
        save_tokens(make_tokens(), p, overwrite=False)


def test_corrupt_and_foreign_files_give_clear_errors(tmp_path):
    bad = tmp_path / "bad.safetensors"
    bad.write_bytes(b"\x00garbage")
    with pytest.raises(ValueError, match="not a readable .safetensors"):
        load_tokens(bad)
    from safetensors.torch import save_file
    save_file({"w": torch.zeros(2)}, str(tmp_path / "lora.safetensors"))
    with pytest.raises(ValueError, match="not a soft-token file"):
        load_tokens(tmp_path / "lora.safetensors")
    with pytest.raises(ValueError, match="does not exist"):
        load_tokens(tmp_path / "missing.safetensors")


def run_cli(*args):
    return subprocess.run([sys.executable, "-m", "training", *map(str, args)], cwd=ROOT,
                          capture_output=True, text=True)


def test_cli_convert_and_info(reference_dir, tmp_path):
    out = tmp_path / "sd3.safetensors"
    r = run_cli("convert", reference_dir / "sd3", "--out", out)
    assert r.returncode == 0, r.stderr
    conv, orig = load_tokens(out), read_official(reference_dir / "sd3")
    assert torch.equal(conv.static, orig.static) and torch.equal(conv.time, orig.time)
    assert conv.meta["blocks_choice"] == "release default"
    r = run_cli("info", out)
    assert r.returncode == 0 and "798,720" in r.stdout and "sd3" in r.stdout
    r = run_cli("info", reference_dir / "sdxl")
    assert r.returncode == 0 and "down, mid" in r.stdout
    r = run_cli("convert", reference_dir / "sd3", "--out", out)
    assert r.returncode == 2 and "exists" in r.stderr
    r = run_cli("info", tmp_path / "nope")
    assert r.returncode == 2 and "does not exist" in r.stderr


# --- non-finite tokens ---------------------------------------------------------------------------

def write_raw_token_file(tok, path):
    """Write tokens with safetensors directly, as a broken trainer might (bypassing save_tokens)."""
    from safetensors.torch import save_file

    meta = {"format": "soft-tokens", "format_version": "1", "method": tok.layout.method,
            "arch": tok.layout.arch, "layout": tok.layout.to_json()}
    save_file({"static": tok.static.detach().clone(), "time": tok.time.detach().clone()}, str(path), metadata=meta)
    return path


def test_nan_token_file_is_refused(tmp_path):
    tok = make_tokens()
    tok.static.data[0, 1, 0, :3] = float("nan")
    path = write_raw_token_file(tok, tmp_path / "nan.safetensors")
    with pytest.raises(ValueError, match=r"nan\.safetensors.*'static' tensor holds 3 non-finite") as e:
        load_tokens(path)
    assert str(path) in str(e.value) and "best.safetensors" in str(e.value)


def test_official_file_with_inf_is_refused(tmp_path):
    torch.save(torch.randn(4, 768), tmp_path / "dc_tokens.pth")
    time = torch.randn(100, 768)
    time[5, 7] = float("inf")
    torch.save(time, tmp_path / "dc_t_tokens.pth")
    with pytest.raises(ValueError, match="'time' tensor holds 1 non-finite") as e:
        load_tokens(tmp_path)
    assert str(tmp_path) in str(e.value)


def test_save_refuses_nan_tokens_and_writes_nothing(tmp_path):
    tok = make_tokens()
    tok.time.data[3, 0] = float("nan")
    out = tmp_path / "t.safetensors"
    with pytest.raises(ValueError, match="'time' tensor holds 1 non-finite") as e:
        save_tokens(tok, out)
    assert str(out) in str(e.value)
    assert list(tmp_path.iterdir()) == []


def test_cli_info_refuses_nan_file(tmp_path, capsys):
    from training.cli import main

    tok = make_tokens()
    tok.static.data.fill_(float("nan"))
    path = write_raw_token_file(tok, tmp_path / "nan.safetensors")
    assert main(["info", str(path)]) == 2
    err = capsys.readouterr().err
    assert str(path) in err and "non-finite" in err
