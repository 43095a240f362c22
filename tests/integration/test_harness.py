"""Tests proving the integration harness (tests/comfy_env.py) works against real ComfyUI."""
import os
import textwrap

import pytest
import torch

TOL = 1e-4


def _randn(*shape, seed):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed))


def _check_batched_cfg(calls, steps):
    assert len(calls) == steps
    for c in calls:  # cond + uncond in ONE model call; ComfyUI orders uncond (1) before cond (0)
        assert c["batch"] == 2 and sorted(c["cond_or_uncond"]) == [0, 1]


@pytest.mark.parametrize("context_dim", [768, 2048])
def test_tiny_sd15_sampling(comfy, context_dim):
    mp = comfy.tiny_sd15(seed=0, context_dim=context_dim)
    pos, neg = _randn(1, 77, context_dim, seed=1), _randn(1, 77, context_dim, seed=2)
    out, calls = comfy.sample(mp, pos, neg, steps=3, cfg=4.0, seed=0, return_calls=True)
    assert out.shape == (1, 4, 8, 8) and torch.isfinite(out).all()
    _check_batched_cfg(calls, 3)
    again = comfy.sample(mp, pos, neg, steps=3, cfg=4.0, seed=0)
    assert torch.equal(out, again)  # deterministic
    swapped = comfy.sample(mp, neg, pos, steps=3, cfg=4.0, seed=0)
    assert (out - swapped).abs().max() > 1e-3  # depends on the conditioning


def test_tiny_sd3_sampling(comfy, sd3):
    pos, neg = _randn(1, 20, 4096, seed=1), _randn(1, 20, 4096, seed=2)
    pooled = _randn(1, 2048, seed=3)
    out, calls = comfy.sample(sd3, pos, neg, positive_pooled=pooled, steps=3, cfg=4.0, seed=0, return_calls=True)
    assert out.shape == (1, 16, 8, 8) and torch.isfinite(out).all()
    _check_batched_cfg(calls, 3)
    assert float(calls[0]["sigma"][0]) == pytest.approx(1.0)  # flow model: sigmas in (0, 1]
    swapped = comfy.sample(sd3, neg, pos, positive_pooled=pooled, steps=3, cfg=4.0, seed=0)
    assert (out - swapped).abs().max() > 1e-3
    other_pooled = comfy.sample(sd3, pos, neg, positive_pooled=-pooled, steps=3, cfg=4.0, seed=0)
    assert (out - other_pooled).abs().max() > 1e-3
    _, calls = comfy.sample(sd3, pos, neg, steps=2, cfg=1.0, seed=0, return_calls=True)
    assert [c["cond_or_uncond"] for c in calls] == [[0], [0]]  # cfg == 1 skips the uncond pass


@pytest.mark.parametrize("context_dim", [768, 2048])
def test_unet_matches_diffusers(comfy, context_dim):
    mp = comfy.tiny_sd15(seed=0, context_dim=context_dim)
    base = mp.model
    net = comfy.diffusers_unet(mp)
    x, ctx = _randn(2, 4, 8, 8, seed=1), _randn(2, 77, context_dim, seed=2)
    t = torch.tensor([999.0, 321.0])
    with torch.no_grad():
        ours = base.diffusion_model(x, t, context=ctx)
        ref = net(x, t, encoder_hidden_states=ctx).sample
        assert (ours - ref).abs().max() <= TOL
        # apply_model works in sigma space: input scaled by c_in, eps -> denoised
        sigma = torch.tensor([14.6146, 1.0])
        ts = base.model_sampling.timestep(sigma).float()
        denoised = base.apply_model(x, sigma, c_crossattn=ctx)
        eps = net(x / (sigma ** 2 + 1).sqrt()[:, None, None, None], ts, encoder_hidden_states=ctx).sample
        assert (denoised - (x - sigma[:, None, None, None] * eps)).abs().max() <= TOL
    back = comfy.diffusers_to_comfy_unet_state_dict(mp, net.state_dict())
    sd = base.diffusion_model.state_dict()
    assert back.keys() == sd.keys() and all(torch.equal(back[k], sd[k]) for k in sd)


def _check_sd3(comfy, mp, full=True):
    base = mp.model
    net = comfy.diffusers_sd3(mp)
    b = 2 if full else 1
    x, ctx, pooled = _randn(b, 16, 8, 8, seed=1), _randn(b, 20, 4096, seed=2), _randn(b, 2048, seed=3)
    sigma = torch.tensor([1.0, 0.25])[:b]
    with torch.no_grad():
        ours = base.diffusion_model(x, sigma * 1000, context=ctx, y=pooled)
        ref = net(hidden_states=x, encoder_hidden_states=ctx, pooled_projections=pooled, timestep=sigma * 1000).sample
        assert (ours - ref).abs().max() <= TOL
        if not full:
            return
        # apply_model: flow model, no input scaling, t = sigma * 1000, denoised = x - sigma * v
        denoised = base.apply_model(x, sigma, c_crossattn=ctx, y=pooled)
        assert (denoised - (x - sigma[:, None, None, None] * ref)).abs().max() <= TOL
    # our table equals diffusers' own sin-cos table (diffusers_sd3_config picks sample_size for that)
    assert torch.equal(comfy.sincos_pos_embed_2d(base.diffusion_model.hidden_size, 16),
                       base.diffusion_model.pos_embed)
    back = comfy.diffusers_to_comfy_sd3_state_dict(mp, net.state_dict())
    sd = base.diffusion_model.state_dict()
    assert back.keys() == sd.keys() and all(torch.equal(back[k], sd[k]) for k in sd)


@pytest.mark.parametrize("depth,num_blocks", [(2, 2), (2, 3)])
def test_mmdit_matches_diffusers(comfy, depth, num_blocks):
    _check_sd3(comfy, comfy.tiny_sd3(seed=0, depth=depth, num_blocks=num_blocks))


@pytest.mark.slow
@pytest.mark.skipif(os.environ.get("COMFY_ENV_SLOW") != "1", reason="set COMFY_ENV_SLOW=1 (depth-24 SD3, ~15 s)")
def test_sd3_width_mmdit_matches_diffusers(comfy):
    """depth=24 (hidden 1536, 24 heads), 6 joint blocks: ~350M params; one forward each side."""
    mp = comfy.tiny_sd3(seed=0, depth=24, num_blocks=6)
    assert mp.model.diffusion_model.hidden_size == 1536
    _check_sd3(comfy, mp, full=False)


def _probe_pack(path, node_name):
    os.makedirs(path)
    with open(os.path.join(path, "__init__.py"), "w") as f:
        f.write(textwrap.dedent("""
            class {0}:
                @classmethod
                def INPUT_TYPES(cls):
                    return {{"required": {{}}}}
                RETURN_TYPES = ()
                FUNCTION = "run"
                CATEGORY = "testing"

            NODE_CLASS_MAPPINGS = {{"{0}": {0}}}
        """).format(node_name))


def test_server_starts_runs_and_stops(comfy_server_factory, tmp_path):
    _probe_pack(str(tmp_path / "linked_pack"), "HarnessProbeLinked")
    _probe_pack(str(tmp_path / "packs" / "yaml_pack"), "HarnessProbeYaml")
    server = comfy_server_factory(packs=[str(tmp_path / "linked_pack")],
                                  extra_custom_nodes_dirs=[str(tmp_path / "packs")])
    info = server.get("/object_info")
    for node in ("KSampler", "CheckpointLoaderSimple", "HarnessProbeLinked", "HarnessProbeYaml"):
        assert node in info, node
    graph = {
        "1": {"class_type": "EmptyLatentImage", "inputs": {"width": 64, "height": 64, "batch_size": 1}},
        "2": {"class_type": "SaveLatent", "inputs": {"samples": ["1", 0], "filename_prefix": "harness/probe"}},
    }
    entry = server.wait_history(server.post_prompt(graph), timeout=60)
    assert entry["status"]["status_str"] == "success", entry["status"]
    assert os.listdir(os.path.join(server.output_dir, "harness"))
    base = server.base_dir
    server.stop()
    assert server.proc.poll() is not None and not os.path.exists(base)
    assert server.failed_custom_nodes() == []
