"""A shortened soft-token demo (--smoke) runs end to end and writes every report file."""

import json

import pytest

from training.demo import pretrain, run
from training.formats import load_tokens


@pytest.mark.skipif(not (pretrain.ASSET_DIR / "config.json").exists(), reason="tiny_t2i asset not shipped")
def test_smoke_demo_writes_every_report_file(tmp_path):
    out = run.run_demo(tmp_path / "report", run.SMOKE, progress=False)
    for name in ("report.md", "results.json", "curves.png", "grid.png", "grid.txt"):
        assert (out / name).stat().st_size > 0, name
    for method in ("softrepa", "agsm"):
        tok = load_tokens(out / "tokens" / f"{method}_seed0.safetensors")
        assert tok.layout.method == method
    res = json.loads((out / "results.json").read_text())
    assert set(res["per_seed"]) == {"base", "softrepa", "agsm"}
    for rows in res["per_seed"].values():
        assert 0 <= rows[0]["geneval_overall"] <= 1 and 0 <= rows[0]["align"] <= 1
    text = (out / "report.md").read_text()
    assert "| softrepa |" in text and "| agsm |" in text and "grid.png" in text
    assert "| softrepa − base |" in text and "paired_delta" in res


def test_paired_deltas_and_missing_categories():
    nan = float("nan")
    results = {"base": [{"a": 0.5, "c": nan}, {"a": 0.7, "c": 0.2}],
               "softrepa": [{"a": 0.6, "c": 0.4}, {"a": 0.7, "c": 0.6}]}
    d = run.paired_deltas(results)["softrepa"]
    assert d["a"] == pytest.approx((0.05, 0.05))
    assert d["c"] == pytest.approx((0.4, 0.0))  # the seed where base had no such prompt is left out
    assert run.summarize(results["base"])["c"] == pytest.approx((0.2, 0.0))
    assert all(v != v for v in run.summarize([{"x": nan}])["x"])  # nothing measured: NaN, not an error
