"""The offline method: the fused path (hidden states + heads, chunked) equals the plain logits path."""

import pytest
import torch

from distil.data import build_examples, collate
from distil.methods.offline import build_offline
from distil.models import freeze, load_model, student_from_teacher
from distil.recipe import DistillSpec
from distil.testing import save_tiny_model


@pytest.mark.parametrize("loss,alpha,temperature", [("forward_kl", 1.0, 1.0), ("jsd", 0.5, 2.0),
                                                    ("reverse_kl", 0.0, 1.0)])
def test_fused_equals_plain(tiny_teacher, loss, alpha, temperature, fp32):
    t = load_model(str(tiny_teacher))
    freeze(t.model)
    student = student_from_teacher(t, [0, 3]).model
    for p in student.parameters():
        p.requires_grad_(True)
    recs = [{"prompt": "ab" * (i + 1), "response": "xyz"[: i + 1]} for i in range(3)]
    batch = collate(build_examples(recs, t.tokenizer, 64), pad_id=0)
    grads, values = [], []
    for fused in (False, True):
        spec = DistillSpec(loss=loss, alpha=alpha, temperature=temperature, fused=fused, chunk_size=7)
        student.zero_grad()
        out = build_offline(t.model, spec, len(t.tokenizer))(student, batch, 100.0)
        out.loss.backward()
        values.append((float(out.loss.detach()), float(out.kd), float(out.ce), out.n_tokens))
        grads.append([p.grad.clone() for p in student.parameters()])
    n, v = values[0][3], len(t.tokenizer)
    assert values[0][3] == values[1][3] > 0
    # Two fp32 computations of one loss: a few ulps of the summands' size, times sqrt(tokens x vocabulary) terms.
    assert values[1][:3] == fp32.approx(values[0][:3], terms=n * v, scale=sum(map(abs, values[0][:3])))
    for a, b in zip(*grads):  # backpropagated through the head and 2 layers: reductions over tokens and vocab
        fp32.assert_close(a, b, terms=n * v)


def test_padded_head_rows_are_never_scored(tmp_path, tiny_teacher, fp32):
    """A student whose embedding is padded beyond the tokenizer (128 rows for 106 tokens): the
    loss only sees the tokenizer's rows, so moving the padding logits changes nothing."""
    t = load_model(str(tiny_teacher))
    freeze(t.model)
    s = load_model(str(save_tiny_model(tmp_path / "padded", vocab_size=128))).model
    batch = collate(build_examples([{"text": "hello world, " * 8}], t.tokenizer, 32), pad_id=0)
    n = float((batch["labels"][:, 1:] != -100).sum())
    for fused in (False, True):
        fn = build_offline(t.model, DistillSpec(fused=fused), 106)
        before = float(fn(s, batch, n).loss.detach())
        with torch.no_grad():
            s.lm_head.weight[106:] += 5.0  # the padding rows
        assert float(fn(s, batch, n).loss.detach()) == fp32.approx(before, terms=int(n) * 106)
