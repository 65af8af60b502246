"""heads.py: the fused loss is used only where `hidden @ W.T (+ b)` reproduces the model's own logits.

Granite divides its logits by `logits_scaling` after the head: a config-key list missed it, and the fused loss
computed something else (plain kd 0.00020 vs fused 0.01255 on a tiny Granite). Now the check reproduces the
logits once and falls back to the plain path, for the teacher and for the student.
"""

import pytest
import torch

from distil.data import build_examples, collate
from distil.heads import fused_head_problem
from distil.methods import build_offline
from distil.recipe import DistillSpec
from distil.testing import char_tokenizer, tiny_llama_config


def _granite(scaling: float, seed: int):
    from transformers import GraniteConfig, GraniteForCausalLM

    base = tiny_llama_config(vocab_size=len(char_tokenizer())).to_dict()
    keep = {k: base[k] for k in ("vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
                                 "num_attention_heads", "num_key_value_heads", "max_position_embeddings",
                                 "rms_norm_eps", "tie_word_embeddings", "bos_token_id", "eos_token_id",
                                 "pad_token_id")}
    torch.manual_seed(seed)
    return GraniteForCausalLM(GraniteConfig(**keep, logits_scaling=scaling))


def _llama(seed: int):
    from transformers import LlamaForCausalLM

    torch.manual_seed(seed)
    return LlamaForCausalLM(tiny_llama_config(vocab_size=len(char_tokenizer())))


def _batch():
    tok = char_tokenizer()
    recs = [{"prompt": "ab" * (i + 1), "response": "xyz"[: i + 1]} for i in range(3)]
    return collate(build_examples(recs, tok, 64), pad_id=0), len(tok)


def test_reproduction_check_finds_the_scaling_and_passes_plain_heads():
    batch, _ = _batch()
    assert fused_head_problem(_llama(0), batch) is None
    assert fused_head_problem(_granite(1.0, 0), batch) is None  # scaling 1 changes nothing: fusable
    problem = fused_head_problem(_granite(4.0, 0), batch)
    assert problem and "does not reproduce its logits" in problem
    model = _granite(4.0, 0).train()
    state = torch.get_rng_state()
    fused_head_problem(model, batch)
    assert model.training and torch.equal(torch.get_rng_state(), state)  # no side effect on the run


@pytest.mark.parametrize("who", ["teacher", "student"])
def test_fused_falls_back_with_one_note_and_equals_the_plain_loss(who):
    batch, vocab = _batch()
    teacher = _granite(4.0, 1) if who == "teacher" else _llama(1)
    student = _llama(2) if who == "teacher" else _granite(4.0, 2)
    teacher.eval().requires_grad_(False)
    n = float((batch["labels"][:, 1:] != -100).sum())
    values, notes = [], []
    for fused in (False, True):
        fn = build_offline(teacher, DistillSpec(fused=fused), vocab, echo=notes.append)
        out = fn(student, batch, n)
        out2 = fn(student, batch, n)  # decided once: the second call neither re-checks nor notes again
        values.append((float(out.loss.detach()), float(out.kd), float(out2.kd)))
    assert len(notes) == 1 and f"the {who}'s hidden @ W.T does not reproduce its logits" in notes[0]
    assert values[1] == pytest.approx(values[0], rel=1e-6)


def test_sparse_loss_refuses_a_global_count_below_its_own_tokens():
    """num_items counts the targets of the whole global batch: below this call's own count it is a bug upstream
    (the loss would be scaled up silently); losses.py refused it, sparse.py now does too."""
    from distil.sparse import sparse_kd_loss

    torch.manual_seed(0)
    s = torch.randn(1, 5, 11)
    labels = torch.tensor([[1, 2, 3, -100, 4]])
    ids = torch.randint(0, 11, (4, 3))
    lp = torch.log_softmax(torch.randn(4, 3), -1)
    tail = torch.full((4,), -30.0)
    sparse_kd_loss(s, ids, lp, tail, labels, num_items=4)  # exactly its own count: fine
    with pytest.raises(ValueError, match="num_items=3 is below this call's 4 valid tokens"):
        sparse_kd_loss(s, ids, lp, tail, labels, num_items=3)
