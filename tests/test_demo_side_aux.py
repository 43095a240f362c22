"""The optional text-only auxiliary loss of demo pretraining (pretrain's side_aux option)."""

import pytest
import torch

from training.demo import pretrain as P
from training.demo import world
from training.demo.textenc import WordTokenizer


def test_object_tokens_are_the_object_words_of_a_relation_caption():
    tok = WordTokenizer(world.vocabulary())
    for spec in [s for s in world.all_specs() if s.kind == "relation"][::17]:
        ids = tok([spec.caption])[0]
        (c0, s0), (c1, s1) = spec.objects
        assert [int(ids[i]) for i in P.OBJECT_TOKENS] == [tok.ids[w] for w in (c0, s0, c1, s1)]


def test_side_labels_follow_the_relation_word_and_skip_other_captions():
    red_circle, blue_square = ("red", "circle"), ("blue", "square")
    specs = [world.Spec("relation", (red_circle, blue_square), relation="left of"),
             world.Spec("count", (red_circle,), 3),
             None,  # a dropped caption
             world.Spec("relation", (red_circle, blue_square), relation="right of")]
    rows, labels = P.side_labels(specs)
    assert rows == [0, 3]
    assert labels.tolist() == [[1, 1, 0, 0], [0, 0, 1, 1]]


def test_side_loss_is_low_for_a_head_that_reads_the_side_and_zero_without_relations():
    specs = [world.Spec("relation", (("red", "circle"), ("blue", "square")), relation=r)
             for r in ("left of", "right of", "left of")]
    _, labels = P.side_labels(specs)
    context = torch.zeros(3, 16, 8)
    context[:, list(P.OBJECT_TOKENS), 0] = labels * 2 - 1  # feature 0 = +1 left, -1 right
    head = torch.nn.Linear(8, 1)
    with torch.no_grad():
        head.weight.zero_()
        head.bias.zero_()
        head.weight[0, 0] = 20.0
    assert P.side_loss(head, context, specs) < 1e-6
    with torch.no_grad():
        head.weight[0, 0] = -20.0
    assert P.side_loss(head, context, specs) > 10
    assert P.side_loss(head, context, [world.Spec("count", (("red", "circle"),), 2), None]) == 0


def test_side_aux_trains_the_text_encoder_and_resumes_exactly(tmp_path):
    torch.set_num_threads(1)
    P.train(tmp_path / "off", steps=2, batch=8, progress=False, side_aux=0.0)
    P.train(tmp_path / "on", steps=2, batch=8, progress=False, side_aux=1.0)
    P.train(tmp_path / "a", steps=4, batch=8, progress=False, side_aux=1.0)
    P.train(tmp_path / "b", steps=2, batch=8, progress=False, side_aux=1.0)
    P.train(tmp_path / "b", steps=4, resume=True, progress=False)  # the weight comes from the checkpoint
    off = torch.load(tmp_path / "off" / "ckpt.pt", weights_only=True)
    on = torch.load(tmp_path / "on" / "ckpt.pt", weights_only=True)
    assert any(not torch.equal(on["text"][k], off["text"][k]) for k in off["text"])
    a = torch.load(tmp_path / "a" / "ckpt.pt", weights_only=True)
    b = torch.load(tmp_path / "b" / "ckpt.pt", weights_only=True)
    assert off["cfg"]["side_aux"] == 0 and b["cfg"]["side_aux"] == 1.0
    assert all(torch.equal(x, y) for x, y in zip(a["ema"], b["ema"]))
    assert all(torch.equal(a["side_head"][k], b["side_head"][k]) for k in a["side_head"])
    with pytest.raises(ValueError, match="side_aux"):
        P.train(tmp_path / "c", steps=1, batch=4, progress=False, side_aux=-1.0)


def test_loss_weights_floor_the_x0_weight_up_to_the_cap():
    abar = P.alphas_cumprod().float()
    snr = abar / (1 - abar)
    plain = P.loss_weights(5.0)
    assert torch.allclose(plain, torch.clamp(snr, max=5.0) / snr)
    floored = P.loss_weights(5.0, x0_floor=0.1, max_weight=10.0)
    assert torch.all(floored >= plain)
    assert torch.equal(floored[snr >= 0.1], plain[snr >= 0.1])  # low t: min-SNR unchanged
    free = (snr < 0.1) & (0.1 / snr <= 10.0)
    assert free.any() and torch.allclose(floored[free] * snr[free], torch.full_like(snr[free], 0.1))
    assert floored.max() == 10.0 and floored[-1] == 10.0  # capped near t = 999
    assert P.loss_weights(5.0, x0_floor=0.1)[-1] == pytest.approx(0.1 / snr[-1].item(), rel=1e-5)


def test_resume_refuses_another_side_aux(tmp_path):
    torch.set_num_threads(1)
    P.train(tmp_path / "a", steps=1, batch=4, progress=False, side_aux=0.0)
    with pytest.raises(ValueError, match="side_aux=0.0, not 0.5"):
        P.train(tmp_path / "a", steps=2, batch=4, resume=True, progress=False, side_aux=0.5)
