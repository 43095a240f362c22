"""Layouts: bucketing, insertion and removal, compatibility checks."""

import pytest
import torch

from training.layouts import TokenLayout, default_blocks, parse_blocks, time_bucket


def test_bucket_basic_values():
    t = torch.tensor([0, 9, 10, 19.9, 500.5, 999])
    assert time_bucket(t).tolist() == [0, 0, 1, 1, 50, 99]


def test_bucket_truncates_floats_toward_zero():
    assert time_bucket(torch.tensor([9.99, 10.0, 989.999])).tolist() == [0, 1, 98]


def test_bucket_any_t_1000_shifts_all_by_one():
    # Official rule: if any element is >= 1000, subtract 1 from *all* of them.
    assert time_bucket(torch.tensor([1000.0, 10.0, 0.5])).tolist() == [99, 0, 0]
    assert time_bucket(torch.tensor([10.0])).tolist() == [1]
    assert time_bucket(torch.tensor([1000])).tolist() == [99]


def test_bucket_clamps_out_of_range():
    assert time_bucket(torch.tensor([2000.0, 5.0])).tolist() == [99, 0]


def unet_layout(**kw):
    d = dict(arch="sd15", method="softrepa", n_tokens=3, width=8, text_width=8, blocks=("down",))
    d.update(kw)
    return TokenLayout(**d)


def mmdit_layout(**kw):
    d = dict(arch="sd3", method="softrepa", n_tokens=3, width=8, text_width=8, blocks=(0, 1))
    d.update(kw)
    return TokenLayout(**d)


@pytest.mark.parametrize("layout, expect", [
    (unet_layout(), lambda x, s: torch.cat([x[:, :1], s, x[:, 1:]], 1)),
    (mmdit_layout(), lambda x, s: torch.cat([s, x], 1)),
    (mmdit_layout(method="agsm"), lambda x, s: torch.cat([x, s], 1)),
])
def test_insert_and_strip(layout, expect):
    x = torch.randn(2, 5, 8)
    s = torch.randn(1, 3, 8)
    y = layout.insert(x, s)
    assert torch.equal(y, expect(x, s.expand(2, -1, -1)))
    assert torch.equal(layout.strip(y), x)
    a, b = layout.token_span(5)
    assert torch.equal(y[:, a:b], s.expand(2, -1, -1))


def test_insert_casts_tokens_to_text_dtype():
    x = torch.randn(1, 4, 8, dtype=torch.float16)
    assert unet_layout().insert(x, torch.randn(1, 3, 8)).dtype == torch.float16


def test_default_blocks_follow_official_releases():
    assert default_blocks("sd15", "softrepa") == ("down",)
    assert default_blocks("sdxl", "softrepa") == ("down", "mid")
    assert default_blocks("sd15", "agsm") == ("down", "mid")
    assert default_blocks("sd3", "softrepa", 5) == (0, 1, 2, 3, 4)


def test_layout_shapes_and_json_round_trip():
    lay = mmdit_layout(width=16, method="agsm", blocks=(0, 1, 2))
    assert lay.static_shape == (2, 3, 3, 16)
    assert lay.time_shape == (100, 24)
    assert lay.projected and lay.position == "append"
    assert type(lay).from_json(lay.to_json()) == lay


def test_unet_blocks_are_canonicalised():
    assert unet_layout(blocks=("mid", "down")).blocks == ("down", "mid")


def test_parse_blocks():
    assert parse_blocks("down, mid") == ("down", "mid")
    assert parse_blocks("0-2,4") == (0, 1, 2, 4)


@pytest.mark.parametrize("kw, msg", [
    (dict(blocks=("sideways",)), "block groups"),
    (dict(n_tokens=0), "n_tokens"),
    (dict(position="prepend"), "does not fit"),
    (dict(method="dpo"), "unknown method"),
])
def test_bad_layouts_are_rejected(kw, msg):
    with pytest.raises(ValueError, match=msg):
        unet_layout(**kw)


def test_check_model_names_both_sides():
    lay = unet_layout(arch="sdxl", width=2048, text_width=2048, blocks=("down", "mid"))
    with pytest.raises(ValueError, match=r"text width 2048.*768 wide \(SD1.5-like\)"):
        lay.check_model("unet", 768)
    with pytest.raises(ValueError, match="for a UNET model.*MMDIT"):
        lay.check_model("mmdit", 2048)
    with pytest.raises(ValueError, match="only 1 joint blocks"):
        mmdit_layout().check_model("mmdit", 8, n_blocks=1)
    mmdit_layout().check_model("mmdit", 8, n_blocks=2)


def test_official_time_table_choice():
    from training.layouts import uses_time_table

    assert uses_time_table("sd15", "softrepa") and uses_time_table("sd3", "softrepa")
    assert not uses_time_table("sdxl", "softrepa") and uses_time_table("sdxl", "agsm")
    assert uses_time_table("sdxl", "softrepa", "on") and not uses_time_table("sd15", "agsm", "off")
    with pytest.raises(ValueError, match="official, on or off"):
        uses_time_table("sd15", "softrepa", "sometimes")
