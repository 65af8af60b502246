"""Unstructured pruning (distil/compress/sparsity.py, method `sparse`): Wanda by hand on a 4x4 example, the exact
2:4 pattern, and sparsity that survives the optimizer steps of the distillation that follows."""

import json

import pytest
import torch
import yaml

from distil.cli import main
from distil.compress import sparsity as S
from distil.errors import DistilError


def test_wanda_by_hand_on_a_4x4_example():
    W = torch.tensor([[1.0, -2.0, 3.0, -4.0],
                      [4.0, 3.0, -2.0, 1.0],
                      [0.5, -0.75, 2.0, -1.2],
                      [-3.0, 1.0, 1.0, 2.5]])
    X = torch.diag(torch.tensor([1.0, 2.0, 0.5, 1.0]))  # 4 calibration tokens: ||X_j||_2 = 1, 2, 0.5, 1
    norms = X.norm(dim=0)
    scores = S.wanda_scores(W, norms)
    expected_scores = torch.tensor([[1.0, 4.0, 1.5, 4.0],
                                    [4.0, 6.0, 1.0, 1.0],
                                    [0.5, 1.5, 1.0, 1.2],
                                    [3.0, 2.0, 0.5, 2.5]], dtype=torch.float64)
    torch.testing.assert_close(scores, expected_scores)
    # 50%, per output row: the two lowest scores of every row go
    keep = S.keep_mask(scores, 0.5, per_row=True)
    assert keep.int().tolist() == [[0, 1, 0, 1], [1, 1, 0, 0], [0, 1, 0, 1], [1, 0, 0, 1]]
    # magnitude alone (per matrix) chooses differently: the input norms matter
    by_magnitude = S.keep_mask(W.abs().double(), 0.5, per_row=False)
    assert by_magnitude.int().tolist() != keep.int().tolist() and int(by_magnitude.sum()) == 8


def test_input_norms_are_the_layer_inputs_norms(tmp_path):
    from transformers import AutoModelForCausalLM

    from distil.testing import tiny_llama_config

    model = AutoModelForCausalLM.from_config(tiny_llama_config()).eval()
    ids = torch.randint(6, 100, (2, 10))
    mask = torch.ones_like(ids)
    mask[0, 7:] = 0
    norms = S.input_norms(model, [{"input_ids": ids, "attention_mask": mask}])
    seen = {}
    h = model.model.layers[1].mlp.down_proj.register_forward_pre_hook(lambda m, a: seen.setdefault("x", a[0]))
    with torch.no_grad():
        model(input_ids=ids, attention_mask=mask)
    h.remove()
    x = seen["x"][mask.bool()].double()
    torch.testing.assert_close(norms["model.layers.1.mlp.down_proj"], x.pow(2).sum(0).sqrt())


def test_two_of_four_is_exact():
    scores = torch.rand(8, 16, generator=torch.Generator().manual_seed(0), dtype=torch.float64)
    keep = S.keep_mask(scores, 0.5, per_row=True, nm=(2, 4))
    groups, kept = scores.view(8, 4, 4), keep.view(8, 4, 4)
    assert (kept.sum(-1) == 2).all()
    top2 = groups.sort(-1, descending=True).values[..., 1:2]  # the second largest of each group
    assert ((groups >= top2) == kept).all()
    with pytest.raises(DistilError, match="multiple of 4"):
        S.keep_mask(torch.rand(2, 6, dtype=torch.float64), 0.5, per_row=True, nm=(2, 4))


def test_unstructured_sparsity_is_exact_per_row_and_per_matrix():
    scores = torch.rand(6, 20, generator=torch.Generator().manual_seed(1), dtype=torch.float64)
    assert (S.keep_mask(scores, 0.3, per_row=True).sum(1) == 14).all()
    keep = S.keep_mask(scores, 0.3, per_row=False)
    assert int(keep.sum()) == 120 - 36
    assert scores[keep].min() >= scores[~keep].max()


def _recipe(tmp_path, tiny_teacher, **sparse):
    recipe = {"name": "s", "teacher": {"source": str(tiny_teacher)}, "student": {"source": "teacher"},
              "data": {"source": "builtin:pydoc", "max_records": 12, "seq_len": 32, "eval_size": 4},
              "distill": {"method": "sparse"}, "sparse": {"calib_examples": 8, **sparse},
              "train": {"steps": 4, "batch_size": 2, "lr": 1e-2, "warmup_steps": 1, "progress": False},
              "eval": {"enabled": True, "batch_size": 2}, "output": {"dir": str(tmp_path / "runs")}}
    path = tmp_path / "recipe.yaml"
    path.write_text(yaml.safe_dump(recipe))
    return path


@pytest.mark.parametrize("sparse", [{"score": "wanda", "sparsity": 0.5}, {"score": "magnitude", "sparsity": 0.3},
                                    {"score": "wanda", "pattern": "2:4"}])
def test_sparsity_survives_the_optimizer_steps(tmp_path, tiny_teacher, sparse):
    from transformers import AutoModelForCausalLM

    path = _recipe(tmp_path, tiny_teacher, **sparse)
    assert main(["run", str(path)]) == 0
    run = tmp_path / "runs" / "s"
    report = json.loads((run / "sparsity.json").read_text())
    target = 0.5 if sparse.get("pattern") == "2:4" else sparse["sparsity"]
    student = AutoModelForCausalLM.from_pretrained(run / "student")
    teacher = AutoModelForCausalLM.from_pretrained(tiny_teacher)
    for name, lin in S.prunable(student).items():  # per matrix (magnitude) or per row (wanda, N:M), floored
        rows, cols = lin.weight.shape
        dropped = rows * int(cols * target) if "score" in sparse and sparse["score"] == "wanda" else \
            int(rows * cols * target)
        assert report["pruned"][name] == dropped / (rows * cols)
    assert report["trained"] == report["pruned"]  # every layer, exactly
    assert S.sparsity_report(student) == report["trained"]
    # training happened: the surviving weights moved (lr 1e-2), the pruned ones stayed zero
    w, w0 = student.model.layers[0].mlp.up_proj.weight, teacher.model.layers[0].mlp.up_proj.weight
    alive = w != 0
    assert not torch.allclose(w[alive], w0[alive])
    if sparse.get("pattern") == "2:4":
        assert ((w.view(w.shape[0], -1, 4) != 0).sum(-1) == 2).all()
    assert "student (sparse, no recovery)" in json.loads((run / "eval.json").read_text())["results"]


def test_masks_are_needed_for_sparsity_to_survive():
    """What the hook prevents: AdamW moves pruned weights off zero when the masks are not applied again."""
    lin = torch.nn.Linear(8, 4)
    mask = S.keep_mask(lin.weight.detach().abs().double(), 0.5, per_row=True)
    with torch.no_grad():
        lin.weight.mul_(mask)
    opt = torch.optim.AdamW(lin.parameters(), lr=1e-2)
    for _ in range(3):
        opt.zero_grad()
        lin(torch.randn(5, 8)).pow(2).sum().backward()
        opt.step()
    assert (lin.weight[~mask] != 0).all()


@pytest.mark.parametrize("sparse,message", [({"pattern": "4:2"}, "sparse.pattern"),
                                            ({"pattern": "two-four"}, "sparse.pattern"),
                                            ({"sparsity": 1.0}, "sparse.sparsity"),
                                            ({"sparsity": 0.0}, "sparse.sparsity")])
def test_bad_input_is_one_line(tmp_path, tiny_teacher, capsys, sparse, message):
    path = _recipe(tmp_path, tiny_teacher, **sparse)
    assert main(["validate", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert message in err and "\n" not in err


def test_a_pattern_a_layer_cannot_take_is_refused_before_anything_is_written(tmp_path, tiny_teacher, capsys):
    path = _recipe(tmp_path, tiny_teacher, pattern="3:7")  # rows of 32 and 64 weights: not multiples of 7
    assert main(["run", str(path)]) == 2
    err = capsys.readouterr().err.strip()
    assert "pattern 3:7" in err and "\n" not in err
    assert not (tmp_path / "runs" / "s").exists()

