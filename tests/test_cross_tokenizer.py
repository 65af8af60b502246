"""Teacher and student with different tokenizers: the logit-level methods are refused in one line naming both
tokenizers and the methods that work across them; SeqKD, synthetic data and CoT (text only) ask the teacher in its
own format and teach the student in the student's; on-policy's sampled-token estimator scores the student's text
re-tokenized by the teacher; the evaluation has perplexities but no KL (the teacher cannot score other tokens).
The pre-flight of one vocabulary: padded embedding matrices are the same vocabulary; two BOS conventions are not."""

import json

import pytest
import torch
import yaml

from distil.cli import main
from distil.data import IGNORE, encode_supervised
from distil.testing import char_tokenizer, save_tiny_model


@pytest.fixture(scope="module")
def pair(tmp_path_factory):
    root = tmp_path_factory.mktemp("pair")
    teacher = save_tiny_model(root / "teacher", seed=1, tokenizer=char_tokenizer(extra_chars="\u00e9\u00e8"),
                              num_hidden_layers=2, tie_word_embeddings=False, initializer_range=0.2)
    student = save_tiny_model(root / "student", seed=2, num_hidden_layers=2)
    return teacher, student


def _recipe(tmp_path, pair, method="seqkd", **extra):
    data = tmp_path / "qa.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"question {i}?", "response": "an answer."}) + "\n"
                            for i in range(8)))
    recipe = {"name": "x", "teacher": {"source": str(pair[0])},
              "student": {"source": str(pair[1]), "eos_token": "<|im_end|>"},
              "data": {"source": str(data), "seq_len": 96, "eval_size": 2},
              "distill": {"method": method}, "seqkd": {"max_new_tokens": 6},
              "train": {"steps": 2, "batch_size": 2, "lr": 1e-3, "warmup_steps": 0, "progress": False},
              "eval": {"batch_size": 2, "answers": 1, "max_new_tokens": 4}, "output": {"dir": str(tmp_path / "runs")}}
    for key, value in extra.items():
        section, leaf = key.split("__")
        recipe.setdefault(section, {})[leaf] = value
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


@pytest.mark.parametrize("method, extra", [("offline", {}), ("hard_labels", {}), ("seqkd", {"seqkd__token_kd": True}),
                                           ("synthetic", {"synthetic__token_kd": True}),
                                           ("onpolicy", {"onpolicy__loss": "jsd"})])
def test_logit_level_methods_are_refused_naming_both_tokenizers(tmp_path, pair, capsys, method, extra):
    path = _recipe(tmp_path, pair, method, **extra)
    assert main(["run", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    assert f"teacher tokenizer '{pair[0]}' (108 tokens) and student tokenizer '{pair[1]}' (106 tokens) differ" in err
    assert f"method '{method}' compares token distributions" in err
    assert "methods that work across tokenizers: seqkd (without token-level KD), synthetic (without token_kd), " \
           "cot (without token_kd), onpolicy (with onpolicy.loss: sampled_reverse_kl), crosstok" in err
    assert not (tmp_path / "runs" / "x").exists()


def test_seqkd_across_tokenizers_asks_in_text_and_teaches_in_the_students_format(tmp_path, pair, capsys):
    from distil.models import load_model

    path = _recipe(tmp_path, pair)
    assert main(["run", str(path)]) == 0
    records = [json.loads(x) for x in (tmp_path / "runs" / "x-seqkd" / "teacher.jsonl").read_text().splitlines()]
    assert len(records) == 6 and all(isinstance(r["prompt"], str) for r in records)  # the question text
    teacher, student = load_model(str(pair[0])), load_model(str(pair[1]))
    # the teacher was asked through its own chat template: its greedy answer by hand
    r = records[0]
    ids = teacher.tokenizer.apply_chat_template([{"role": "user", "content": r["prompt"]}], add_generation_prompt=True,
                                                tokenize=True, return_dict=False)
    out = []
    with torch.no_grad():
        for _ in range(6):
            t = int(teacher.model(input_ids=torch.tensor([ids + out])).logits[0, -1].argmax())
            if t == teacher.tokenizer.eos_token_id:
                break
            out.append(t)
    assert r["completion"] == teacher.tokenizer.decode(out, skip_special_tokens=True)
    assert r["prompt_tokens"] == len(ids)
    # no KL across vocabularies: perplexities of the student rows only; the teacher still answers (in text)
    record = json.loads((tmp_path / "runs" / "x" / "eval.json").read_text())
    assert set(record["results"]) == {"student (before)", "student (seqkd)"}
    assert all("kl" not in row and row["ppl"] > 0 for row in record["results"].values())
    assert set(record["generation"]["answers"]) == {"teacher", "student (before)", "student (seqkd)"}
    # `distil eval` takes the same path
    assert main(["eval", str(tmp_path / "runs" / "x")]) == 0


def test_text_examples_are_the_students_own_rendering_and_cut_answers_do_not_end():
    from distil.compat import turn_end
    from distil.methods.seqkd import text_examples

    tok = char_tokenizer()
    tok.eos_token = "<|im_end|>"
    end = turn_end(tok, chat=True)
    records = [{"prompt_index": 0, "completion": "yes", "finish_reason": "stop"},
               {"prompt_index": 1, "completion": "long", "finish_reason": "length"}]
    done, cut = text_examples(["q0", "q1"], records, tok, 256, True, end)
    assert done == {k: v for k, v in encode_supervised(tok, {"prompt": "q0", "response": "yes"}, "prompt_response",
                                                        True, "t").items()}
    targets = [v for v in done["labels"] if v != IGNORE]
    assert tok.decode(targets) == "yes<|im_end|>\n"
    assert tok.decode([v for v in cut["labels"] if v != IGNORE]) == "long"  # no turn end: it did not finish
    assert cut["input_ids"][-1] == tok.convert_tokens_to_ids("g")


# ----------------------------------------------------------------------------------------------------------------
# The pre-flight of one vocabulary: padded embeddings, BOS conventions


def test_a_padded_embedding_matrix_is_the_same_vocabulary(tmp_path):
    from distil.methods import METHODS
    from distil.models import load_model
    from distil.pipeline import pair_vocabulary
    from distil.recipe import load_recipe

    tok = char_tokenizer()
    teacher = save_tiny_model(tmp_path / "t", seed=1, tokenizer=tok)
    student = save_tiny_model(tmp_path / "s", seed=2, tokenizer=tok, vocab_size=len(tok) + 22)  # padded to 128
    t, s = load_model(str(teacher)), load_model(str(student))
    assert s.model.get_output_embeddings().weight.shape[0] == 128 != len(s.tokenizer)
    recipe = load_recipe(_recipe(tmp_path, (teacher, student), "offline"))
    assert pair_vocabulary(METHODS["offline"], recipe, t, s) == (len(tok), True)  # logits sliced to 106
    assert main(["run", str(_recipe(tmp_path, (teacher, student), "offline"))]) == 0
    record = json.loads((tmp_path / "runs" / "x" / "eval.json").read_text())
    assert all(row["kl"] >= 0 for name, row in record["results"].items() if name != "teacher")


def test_two_bos_conventions_under_one_vocabulary_are_refused_naming_both(tmp_path, capsys):
    from test_crosstok import word_tokenizer

    gemma_like = word_tokenizer([], bos=True)  # the character vocabulary, and BOS in front of every text
    assert gemma_like.get_vocab() == char_tokenizer().get_vocab() and gemma_like("a")["input_ids"][0] == 1
    teacher = save_tiny_model(tmp_path / "t", seed=1, tokenizer=gemma_like)
    student = save_tiny_model(tmp_path / "s", seed=2)
    for method in ("offline", "seqkd"):
        assert main(["run", str(_recipe(tmp_path, (teacher, student), method))]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1, err
        assert (f"the teacher's tokenizer ({teacher}) starts every sequence with BOS '<s>' and the student's "
                f"({student}) adds no BOS; the teacher reads the student's token ids, so expected one BOS "
                f"convention, found two") in err
        assert not (tmp_path / "runs" / "x").exists()


def test_across_tokenizers_each_model_gets_its_own_bos(tmp_path):
    """A Gemma-like teacher (base: no template, adds BOS) with a SmolLM2-like student (none): SeqKD asks the
    teacher with its BOS, the student learns without one."""
    from test_crosstok import BIGRAMS, word_tokenizer

    t = word_tokenizer(BIGRAMS, bos=True, template=False)
    teacher = save_tiny_model(tmp_path / "t", seed=1, tokenizer=t)
    student = save_tiny_model(tmp_path / "s", seed=2)
    assert main(["run", str(_recipe(tmp_path, (teacher, student), "seqkd", data__chat_template=False))]) == 0
    records = [json.loads(x) for x in (tmp_path / "runs" / "x-seqkd" / "teacher.jsonl").read_text().splitlines()]
    assert records[0]["prompt_tokens"] == len(t(records[0]["prompt"])["input_ids"])  # <s> + its own pieces
    assert records[0]["prompt_tokens"] == 1 + len(t(records[0]["prompt"], add_special_tokens=False)["input_ids"])


def test_a_teacher_whose_template_drops_the_bos_its_tokenizer_adds_is_refused():
    from test_crosstok import BIGRAMS, word_tokenizer

    from distil.compat import check_teacher_data
    from distil.errors import DistilError

    teacher = word_tokenizer(BIGRAMS, bos=True)  # adds <s>, but its ChatML template writes none
    student = char_tokenizer()
    student.eos_token = "<|im_end|>"
    with pytest.raises(DistilError, match="needs BOS at position 0 .* but its chat template renders none"):
        check_teacher_data(teacher, student, chat=True, where="seqkd", ids_cross=False)
    assert check_teacher_data(teacher, student, chat=False, where="seqkd", ids_cross=False)  # plain text: its BOS


# ----------------------------------------------------------------------------------------------------------------
# Synthetic data and CoT: the teacher's text crosses, token ids do not


def test_synthetic_across_tokenizers_asks_every_prompt_as_text(tmp_path, pair):
    path = _recipe(tmp_path, pair, "synthetic", synthetic__max_new_tokens=6, synthetic__temperature=1.0,
                   synthetic__min_tokens=1, synthetic__decontam_n=0, synthetic__max_repetition=1.0)
    assert main(["run", str(path)]) == 0
    base = tmp_path / "runs" / "x-synthetic"
    asked = [json.loads(x) for x in (base / "teacher.jsonl").read_text().splitlines()]
    held = [json.loads(x) for x in (base / "heldout.jsonl").read_text().splitlines()]
    # the held-out prompts too reach the teacher as their question text (token ids would be another vocabulary's)
    assert len(held) == 2 and all(isinstance(r["prompt"], str) and r["prompt"].startswith("question") for r in held)
    assert all(isinstance(r["prompt"], str) for r in asked)
    record = json.loads((tmp_path / "runs" / "x" / "eval.json").read_text())
    assert set(record["results"]) == {"student (before)", "student (synthetic)"}  # no KL row for the teacher


def test_cot_across_tokenizers_asks_questions_as_text_and_learns_in_student_tokens(tmp_path, taught_teacher):
    from test_cot import _cot_recipe

    student = save_tiny_model(tmp_path / "s", seed=2, tokenizer=char_tokenizer(extra_chars="\u00e9"))
    path = _cot_recipe(tmp_path, taught_teacher)
    assert main(["run", str(path), f"student.source={student}"]) == 0
    samples = [json.loads(x) for x in (tmp_path / "runs" / "c-cot" / "teacher.jsonl").read_text().splitlines()]
    assert all(isinstance(s["prompt"], str) and s["prompt"].endswith("=") for s in samples)  # '1+4=' as text
    prov = json.loads((tmp_path / "runs" / "c" / "cot.json").read_text())
    assert prov["summary"]["kept"] > 0
    # the golds come from the student's own examples (its tokens decoded): a + b of each question
    for q, s in zip(prov["questions"], sorted({s["prompt_index"]: s for s in samples}.values(),
                                             key=lambda s: s["prompt_index"])):
        a, b = s["prompt"].rstrip("=").split("+")
        assert q["gold"] == int(a) + int(b)


from test_cot import taught_teacher  # noqa: E402,F401  (the fixture: a tiny teacher that learned the stub task)


# ----------------------------------------------------------------------------------------------------------------
# On-policy: the student's text re-tokenized by the teacher


def test_cross_teacher_logp_scores_each_group_by_the_teachers_own_tokens(tmp_path):
    from test_crosstok import BIGRAMS, word_tokenizer

    from distil.methods.onpolicy import cross_teacher_logp
    from distil.models import load_model

    teacher = load_model(str(save_tiny_model(tmp_path / "t", seed=1, tokenizer=word_tokenizer(BIGRAMS, bos=True),
                                             initializer_range=0.2)))
    s_tok = char_tokenizer()
    prompt, completion = "Q: ", "the cat"
    ids = s_tok(prompt + completion, add_special_tokens=False)["input_ids"] + [s_tok.eos_token_id]
    labels = [IGNORE] * len(prompt) + ids[len(prompt):]
    batch = {"input_ids": torch.tensor([ids]), "labels": torch.tensor([labels]),
             "attention_mask": torch.ones(1, len(ids), dtype=torch.long)}
    lp_s = torch.randn(1, len(ids) - 1).double()  # the student's own log-probs of its tokens (any numbers)
    stops = [teacher.tokenizer.eos_token_id]
    got = cross_teacher_logp(batch, lp_s, s_tok, teacher.model, teacher.tokenizer, stops)
    # by hand: the teacher reads '<s>' 'Q' ':' ' ' 'the' ' ' 'c' 'at' (its BOS, its pieces)
    t_ids = teacher.tokenizer(prompt + completion)["input_ids"]
    assert teacher.tokenizer.convert_ids_to_tokens(t_ids) == ["<s>", "Q", ":", " ", "the", " ", "c", "at"]
    with torch.no_grad():
        logp = teacher.model(input_ids=torch.tensor([t_ids])).logits[0].double().log_softmax(-1)
    lp_t = lambda j: float(logp[j - 1, t_ids[j]])  # noqa: E731  teacher token j given the tokens before it
    p = len(prompt)  # student positions: 't' p, 'h' p+1, 'e' p+2, ' ' p+3, 'c' p+4, 'a' p+5, 't' p+6, EOS p+7
    group_the = lp_t(4) - float(lp_s[0, p - 1:p + 2].sum())  # one teacher token for three student tokens
    group_at = lp_t(7) - float(lp_s[0, p + 4:p + 6].sum())
    want = lp_s[0].clone()
    want[p - 1:p + 2] += group_the / 3  # the group's log-ratio shared evenly
    want[p + 2] = lp_t(5)  # ' ' <- ' ' : exact
    want[p + 3] = lp_t(6)  # 'c' <- 'c'
    want[p + 4:p + 6] += group_at / 2
    want[p + 6] = float(torch.logsumexp(logp[len(t_ids) - 1, stops], 0))  # EOS: the teacher stopping after 'at'
    # the teacher's log-probs come from fp32 forwards of different shapes (kernels sum in another order): fp32 precision
    assert torch.allclose(got[0], want, rtol=1e-5, atol=1e-5)
    assert torch.equal(got[0, :p - 1], lp_s[0, :p - 1])  # the prompt: not scored (not targets)
    # the advantages of a group sum to its exact log-ratio
    assert float((got[0, p - 1:p + 2] - lp_s[0, p - 1:p + 2]).sum()) == pytest.approx(group_the, rel=1e-5, abs=1e-5)


def test_onpolicy_sampled_reverse_kl_runs_across_tokenizers(tmp_path, pair):
    path = _recipe(tmp_path, pair, "onpolicy", onpolicy__loss="sampled_reverse_kl", onpolicy__lmbda=1.0,
                   onpolicy__max_new_tokens=5, eval__answers=0)
    assert main(["run", str(path)]) == 0
    rows = [json.loads(x) for x in (tmp_path / "runs" / "x" / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 2 and all(r["student_samples"] == 1 and "kl" in r for r in rows)
