"""A shortened soft-token demo (--smoke) runs end to end and writes every report file."""

import json

import pytest
import torch

from training.demo import pretrain, run
from training.formats import load_tokens


@pytest.mark.skipif(not (pretrain.ASSET_DIR / "config.json").exists(), reason="tiny_t2i asset not shipped")
def test_smoke_demo_writes_every_report_file(tmp_path):
    out = run.run_demo(tmp_path / "report", run.SMOKE, progress=False, workers=2)  # the CLI's default on 2 threads
    for name in ("report.md", "results.json", "curves.png", "grid.png", "grid.txt"):
        assert (out / name).stat().st_size > 0, name
    for method in ("softrepa", "agsm"):
        tok = load_tokens(out / "tokens" / f"{method}_seed0.safetensors")
        assert tok.layout.method == method
    res = json.loads((out / "results.json").read_text())
    assert set(res["per_seed"]) == {"base", "base_cfg", "softrepa", "agsm", "refine", "both"}
    for cond, rows in res["per_seed"].items():
        assert 0 <= rows[0]["geneval_overall"] <= 1 and 0 <= rows[0]["align"] <= 1
        assert ("general_geneval_overall" in rows[0]) == (cond in ("base", "softrepa", "agsm"))  # generalisation rows
    assert set(res["diagnostic"]) == {"colour", "shape", "count", "binding", "position"}
    text = (out / "report.md").read_text()
    for part in ("## Where the signal is", "## Main result", "## Generalisation", "## Settings that differ",
                 "| SoftREPA |", "| AGSM |", "| base at CFG 6 |", "| SoftREPA − base |", "grid.png",
                 "batch composition", "Paired change per seed"):
        assert part in text, part
    assert "paired_delta" in res
    # token training sees only t < t_max (the demo's deviation from the papers' full range), and says so
    assert res["size"]["t_max"] == run.SMOKE.t_max < 1000 and "| training timesteps | t < " in text
    hist = json.loads((out / "tokens" / "softrepa_seed0.history.json").read_text())
    ts = [r["t"] if run.SMOKE.accum > 1 else [r["t"]] for r in hist["steps"]]  # a list of accum t's per step
    assert len(ts) == run.SMOKE.steps and all(len(x) == run.SMOKE.accum and max(x) < run.SMOKE.t_max for x in ts)
    assert res["workers"] == 2 and "(2 worker\nprocesses)" in text

    # the same results when this process runs every job itself (on 1 thread, like each worker)
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        alone = run.run_demo(tmp_path / "alone", run.SMOKE, progress=False, workers=1)
    finally:
        torch.set_num_threads(threads)
    assert json.loads((alone / "results.json").read_text())["per_seed"] == res["per_seed"]
    for method in ("softrepa", "agsm"):
        name = f"{method}_seed0.safetensors"
        assert torch.equal(load_tokens(alone / "tokens" / name).static, load_tokens(out / "tokens" / name).static)
    with pytest.raises(ValueError, match="workers"):
        run.run_demo(tmp_path / "none", run.SMOKE, progress=False, workers=0)


def test_paired_deltas_and_missing_categories():
    nan = float("nan")
    results = {"base": [{"a": 0.5, "c": nan}, {"a": 0.7, "c": 0.2}],
               "softrepa": [{"a": 0.6, "c": 0.4}, {"a": 0.7, "c": 0.6}]}
    d = run.paired_deltas(results)["softrepa"]
    assert d["a"] == pytest.approx((0.05, 0.05))
    assert d["c"] == pytest.approx((0.4, 0.0))  # the seed where base had no such prompt is left out
    assert run.summarize(results["base"])["c"] == pytest.approx((0.2, 0.0))
    assert all(v != v for v in run.summarize([{"x": nan}])["x"])  # nothing measured: NaN, not an error


def test_out_names_the_report_folder(tmp_path, monkeypatch):
    from training.cli import main

    seen = {}

    def fake_run(out, size, model=None, workers=1):
        seen["out"], seen["workers"] = out, workers
        return tmp_path

    monkeypatch.setattr(run, "run_demo", fake_run)
    main(["demo", "--smoke", "--out", str(tmp_path / "mine")])
    assert seen["out"] == str(tmp_path / "mine")
    assert seen["workers"] == 2  # default: one 1-thread worker per --threads (2)
    seen.clear()
    main(["demo", "--long"])
    assert seen["out"] == "demo_long"


def test_cli_rejects_zero_workers_before_any_work(tmp_path, capsys):
    from training.cli import main

    assert main(["demo", "--smoke", "--workers", "0", "--out", str(tmp_path / "r")]) == 2
    assert "workers must be at least 1" in capsys.readouterr().err
    assert not (tmp_path / "r").exists()


def test_near_miss_batches_are_deterministic_groups_of_the_train_split():
    import torch

    from training.demo import world
    from training.demo.batches import NearMissData

    encode = lambda caps: torch.zeros(len(caps), 16, 8)  # noqa: E731
    data = NearMissData(encode, seed=3)
    train = set(world.split_specs("train"))
    kinds = set()
    for step in range(40):
        specs = data.specs(step)
        assert specs == data.specs(step) and len(specs) == 4 and set(specs) <= train
        kinds.add(specs[0].kind)
        if specs[0].kind == "relation":  # the same two objects, rearranged
            assert len({frozenset(s.objects) | {frozenset()} for s in specs}) <= 3
            assert len(set(specs)) == 4
        else:
            assert len({s.count for s in specs}) >= 3
    assert kinds == {"count", "relation"}
    x0, cond = data.batch(5)
    assert x0.shape == (4, 12, 16, 16) and cond["context"].shape[0] == 4
    assert torch.equal(data.batch(5)[0], x0)
    with pytest.raises(ValueError, match="batch must be 4"):
        NearMissData(encode, batch=8)
