"""The compatibility pre-flight of teacher-written data (distil/compat.py): one vocabulary, a chat format the
student has, special tokens that stay one token, and a student that stops where its answers end."""

import json

import pytest
import yaml

from distil.cli import main
from distil.compat import check_teacher_data, turn_end
from distil.data import IGNORE
from distil.errors import DistilError
from distil.testing import CHATML, char_tokenizer


def _ids(tok, *tokens):
    return [tok.convert_tokens_to_ids(t) for t in tokens]


def test_turn_end_is_what_the_template_writes_after_an_answer():
    tok = char_tokenizer()
    assert turn_end(tok, chat=True) == _ids(tok, "<|im_end|>", "\n")  # ChatML: '<|im_end|>' + '\n'
    assert turn_end(tok, chat=False) == _ids(tok, "</s>")  # plain text ends with the EOS
    tok.chat_template = "{% for m in messages %}{{ m['content'] }}{% endfor %}"  # writes nothing after an answer
    assert turn_end(tok, chat=True) == _ids(tok, "</s>")


def test_an_instruct_student_that_stops_at_its_turn_end_passes():
    teacher, student = char_tokenizer(), char_tokenizer()
    student.eos_token = "<|im_end|>"
    assert check_teacher_data(teacher, student) == _ids(student, "<|im_end|>", "\n")


def test_a_student_that_would_never_stop_is_refused_naming_both_tokens():
    # the char tokenizer is a "base" student: EOS '</s>', yet its ChatML template ends turns with '<|im_end|>'
    with pytest.raises(DistilError) as err:
        check_teacher_data(char_tokenizer(), char_tokenizer(), where="seqkd")
    msg = str(err.value)
    assert "\n" not in msg and "'<|im_end|>'" in msg and "'</s>'" in msg and "never stop" in msg
    assert "student.eos_token: '<|im_end|>'" in msg


def test_the_generation_config_eos_counts_as_a_stop():
    class Gen:
        eos_token_id = [2, 5]  # instruct models list their turn end here

    class Model:
        generation_config = Gen()

    tok = char_tokenizer()
    assert check_teacher_data(tok, tok, student_model=Model()) == _ids(tok, "<|im_end|>", "\n")


def test_different_vocabularies_are_refused_naming_both_tokenizers():
    teacher, student = char_tokenizer(), char_tokenizer(extra_chars="\u00e9")
    teacher.name_or_path, student.name_or_path = "teacher-tok", "student-tok"
    with pytest.raises(DistilError, match=r"teacher-tok, 106 tokens\) and the student's \(student-tok, 107 tokens"):
        check_teacher_data(teacher, student)


def test_a_chat_teacher_with_a_template_less_student_is_refused():
    teacher, student = char_tokenizer(), char_tokenizer()
    student.chat_template = None
    with pytest.raises(DistilError, match="student.chat_template: teacher"):
        check_teacher_data(teacher, student)
    # plain text on both sides is fine: the answer ends with the EOS
    assert check_teacher_data(teacher, student, chat=False) == _ids(student, "</s>")


def test_a_template_token_the_student_splits_is_refused():
    from tokenizers import Regex, Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    teacher = char_tokenizer()
    # the same vocabulary, but '<|im_start|>' / '<|im_end|>' are not registered as tokens: the character
    # pre-tokenizer splits them into 12 pieces
    tk = Tokenizer(models.WordLevel(vocab=teacher.get_vocab(), unk_token="<unk>"))
    tk.pre_tokenizer = pre_tokenizers.Split(Regex(r"[\s\S]"), behavior="isolated")
    tk.decoder = decoders.Fuse()
    student = PreTrainedTokenizerFast(tokenizer_object=tk, pad_token="<pad>", bos_token="<s>", eos_token="</s>",
                                      unk_token="<unk>")
    student.chat_template = CHATML
    assert student.get_vocab() == teacher.get_vocab()
    with pytest.raises(DistilError, match=r"splits its chat template's special token '<\|im_end\|>' into 10 pieces"):
        check_teacher_data(teacher, student)


# ------------------------------------------------------------------------------------------------
# through a recipe: refused before anything is generated, fixed by student.eos_token


def _recipe(tmp_path, tiny_teacher, **student):
    data = tmp_path / "qa.jsonl"
    data.write_text("".join(json.dumps({"prompt": f"question {i}?", "response": "an answer"}) + "\n"
                            for i in range(6)))
    recipe = {"name": "c", "teacher": {"source": str(tiny_teacher)},
              "student": {"source": "teacher", "layers": [0, 3], **student},
              "data": {"source": str(data), "seq_len": 96, "eval_size": 2},
              "distill": {"method": "seqkd"}, "seqkd": {"max_new_tokens": 5},
              "train": {"steps": 1, "batch_size": 2, "lr": 1e-3, "warmup_steps": 0, "progress": False},
              "eval": {"enabled": False}, "output": {"dir": str(tmp_path / "runs")}}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


def test_seqkd_refuses_a_never_stopping_student_then_runs_with_student_eos_token(tmp_path, tiny_teacher, capsys):
    from distil.methods import seqkd
    from distil.models import load_model

    path = _recipe(tmp_path, tiny_teacher)
    assert main(["run", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "never stop" in err, err
    assert not (tmp_path / "runs" / "c-seqkd" / "teacher.jsonl").exists()  # refused before generating

    path = _recipe(tmp_path, tiny_teacher, eos_token="<|im_end|>")
    assert main(["run", str(path)]) == 0
    saved = load_model(str(tmp_path / "runs" / "c" / "student"))
    end = _ids(saved.tokenizer, "<|im_end|>", "\n")
    assert saved.tokenizer.eos_token == "<|im_end|>" and saved.model.config.eos_token_id == end[0]
    assert saved.model.generation_config.eos_token_id == end[0]
    # the learned answers end with the student's turn end ('<|im_end|>\n'), as data.py's chat targets do
    records = [json.loads(x) for x in (tmp_path / "runs" / "c-seqkd" / "teacher.jsonl").read_text().splitlines()]
    r = {**records[0], "finish_reason": "stop", "prompt_index": 0}
    ex = seqkd.teacher_examples([[7, 8]], [r], saved.tokenizer, 96, end)[0]
    targets = [v for v in ex["labels"] if v != IGNORE]
    assert targets[-2:] == end


def test_student_only_keys_are_refused_on_the_teacher_and_unknown_eos_tokens(tmp_path, tiny_teacher, capsys):
    path = _recipe(tmp_path, tiny_teacher)
    assert main(["validate", str(path), "teacher.eos_token=</s>"]) == 2
    assert "teacher.eos_token: a student-only key" in capsys.readouterr().err
    assert main(["run", str(path), "student.eos_token=<|nope|>"]) == 2
    err = capsys.readouterr().err
    assert "student.eos_token: expected a token of the student's vocabulary, found '<|nope|>'" in err
