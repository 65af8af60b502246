"""Teacher-logit cache and sparse top-k losses: golden values, resumable writes, identity checks, CLI."""

import json
import math
import shutil

import pytest
import torch
import torch.nn.functional as F
import yaml

from distil.cli import main
from distil.data import collate
from distil.errors import DistilError
from distil.losses import distillation_loss, token_divergence
from distil.methods.cache import TeacherCache, cache_for_recipe, default_dir, ensure_cache, read_manifest
from distil.recipe import load_recipe
from distil.sparse import retemper, sparse_kd_loss
from distil.testing import char_tokenizer, save_tiny_model

# ----------------------------------------------------------------------------------------------------------------
# Sparse losses: golden tests


def _topk_targets(t_logits, labels, k, temperature=1.0):
    """What the cache stores, in fp32: top-k ids/log-probs and log tail mass at the valid rows."""
    z = t_logits.reshape(-1, t_logits.shape[-1])[labels.reshape(-1) != -100].float() / temperature
    lse = torch.logsumexp(z, -1, keepdim=True)
    top, ids = torch.topk(z, k, dim=-1)
    rest = z.scatter(1, ids, float("-inf"))
    return ids, top - lse, torch.logsumexp(rest, -1) - lse.squeeze(1)


@pytest.mark.parametrize("tail", ["renorm", "tail_term"])
@pytest.mark.parametrize("temperature,alpha", [(1.0, 1.0), (2.0, 1.0), (1.0, 0.3), (3.0, 0.5)])
def test_full_support_equals_dense_forward_kl(tail, temperature, alpha, fp32):
    torch.manual_seed(0)
    v = 13
    s = torch.randn(3, 7, v) * 2
    t = torch.randn(3, 7, v) * 2
    labels = torch.randint(0, v, (3, 7))
    labels[0, :3] = -100
    labels[2, 5:] = -100
    # logits[:, :-1] is not viewable as [N, V]: exercises the gathered-rows path, with small chunks
    s_view, t_view, y = s[:, :-1], t[:, :-1], labels[:, 1:]
    ids, lp, lt = _topk_targets(t_view, y, v, temperature)
    assert torch.isinf(lt).all()  # k = V: no tail
    a = s_view.detach().clone().requires_grad_(True)
    b = s.detach().clone().requires_grad_(True)
    sparse = sparse_kd_loss(a, ids, lp, lt, y, tail=tail, temperature=temperature, cache_temperature=temperature,
                            alpha=alpha, num_items=40, chunk_size=4)
    dense = distillation_loss(b[:, :-1], t_view, y, kind="forward_kl", temperature=temperature, alpha=alpha,
                              num_items=40, chunk_size=None)
    n = int((y != -100).sum())
    # two fp32 computations of one loss: a few ulps of the summands' size, times sqrt(tokens x vocabulary)
    tol = dict(terms=n * v, scale=abs(dense.loss.item()) + abs(dense.kd.item()) + abs(dense.ce.item()))
    assert sparse.loss.item() == fp32.approx(dense.loss.item(), **tol)
    assert sparse.kd.item() == fp32.approx(dense.kd.item(), **tol)
    assert sparse.ce.item() == fp32.approx(dense.ce.item(), **tol)
    sparse.loss.backward()
    dense.loss.backward()
    fp32.assert_close(a.grad, b.grad[:, :-1], terms=v)
    assert sparse.n_tokens == dense.n_tokens == n


def test_tail_term_by_hand_on_a_5_token_vocabulary(fp32):
    p_t = [0.5, 0.3, 0.1, 0.06, 0.04]
    z_s = torch.tensor([[1.0, 2.0, 0.5, -1.0, 0.0]])
    p_s = torch.softmax(z_s.double(), -1)[0].tolist()  # the reference in float64
    ids = torch.tensor([[0, 1]])
    lp = torch.tensor([[math.log(0.5), math.log(0.3)]])
    tail = torch.tensor([math.log(0.2)])
    ps_top = p_s[0] + p_s[1]
    expected = (0.5 * math.log(0.5 / p_s[0]) + 0.3 * math.log(0.3 / p_s[1])
                + 0.2 * math.log(0.2 / (1 - ps_top)))
    z = z_s.clone().requires_grad_(True)
    out = sparse_kd_loss(z, ids, lp, tail, torch.tensor([2]), tail="tail_term")
    assert out.loss.item() == fp32.approx(expected, terms=5, scale=2.0)  # summands: p log(p / q) with |log| < 2
    assert expected < float(token_divergence(z_s, torch.tensor([p_t]).log(), "forward_kl"))  # a lower bound of KL
    out.loss.backward()
    # by hand: p_S - p_T on the support; p_S (1 - (1-P_T)/(1-P_S)) off it
    ratio = 0.2 / (1 - ps_top)
    want = [p_s[0] - 0.5, p_s[1] - 0.3] + [p * (1 - ratio) for p in p_s[2:]]
    fp32.assert_close(z.grad[0], torch.tensor(want, dtype=torch.float64), terms=5)
    # renorm on the same numbers: q = (0.625, 0.375)
    out = sparse_kd_loss(z_s, ids, lp, tail, torch.tensor([2]), tail="renorm")
    assert out.loss.item() == fp32.approx(0.625 * math.log(0.625 / p_s[0]) + 0.375 * math.log(0.375 / p_s[1]),
                                          terms=5, scale=2.0)


def _renorm_kl64(s, ids, lp, temperature):
    """Independently, in float64: T^2 KL(q || softmax(s / T)) per row, q = the renormalised top-k (0 elsewhere),
    and the size of its summands (what its fp32 rounding error scales with)."""
    q = torch.softmax(lp.double(), -1)
    ls = torch.log_softmax(s.double() / temperature, -1).gather(1, ids)
    return temperature**2 * (q * (q.log() - ls)).sum(-1), temperature**2 * (q * (q.log().abs() + ls.abs())).sum(-1)


@pytest.mark.parametrize("temperature,alpha", [(1.0, 1.0), (2.0, 0.7)])
def test_renorm_equals_kl_of_the_renormalised_teacher_computed_densely(temperature, alpha, fp32):
    torch.manual_seed(1)
    n, v, k = 9, 40, 6
    s, t = torch.randn(n, v) * 3, torch.randn(n, v) * 3
    y = torch.randint(0, v, (n,))
    ids, lp, lt = _topk_targets(t, y, k, temperature)
    a = s.clone().requires_grad_(True)
    b = s.double().requires_grad_(True)
    sparse = sparse_kd_loss(a, ids, lp, lt, y, tail="renorm", temperature=temperature,
                            cache_temperature=temperature, alpha=alpha)
    kd, kd_scale = _renorm_kl64(b, ids, lp, temperature)
    ce = F.cross_entropy(b, y, reduction="none")
    dense = (alpha * kd + (1 - alpha) * ce).sum() / n
    scale = float((kd_scale + ce).mean().detach())  # the summands' size
    assert sparse.loss.item() == fp32.approx(dense.item(), terms=n * v, scale=scale)
    sparse.loss.backward()
    dense.backward()
    fp32.assert_close(a.grad, b.grad, terms=v)


def test_tail_term_gradient_matches_autograd_of_the_formula(fp32):
    torch.manual_seed(2)
    n, v, k, temperature, alpha = 5, 30, 4, 1.0, 0.6
    s, t = torch.randn(n, v) * 2, torch.randn(n, v) * 2
    y = torch.randint(0, v, (n,))
    ids, lp, lt = _topk_targets(t, y, k)
    a = s.clone().requires_grad_(True)
    b = s.double().requires_grad_(True)  # the formula and its autograd in float64
    out = sparse_kd_loss(a, ids, lp, lt, y, tail="tail_term", alpha=alpha)
    lp, lt = lp.double(), lt.double()
    ls = torch.log_softmax(b, -1)
    ls_s = ls.gather(1, ids)
    p_t_tail = lt.exp()
    ps_tail = 1 - ls_s.exp().sum(-1)
    kd = (lp.exp() * (lp - ls_s)).sum(-1) + p_t_tail * (lt - ps_tail.log())
    ce = F.cross_entropy(b, y, reduction="none")
    ref = (alpha * kd + (1 - alpha) * ce).sum() / n
    scale = float(((lp.exp() * (lp.abs() + ls_s.abs())).sum(-1) + ce).mean().detach()) + 1.0  # summands' size
    assert out.loss.item() == fp32.approx(ref.item(), terms=n * v, scale=scale)
    out.loss.backward()
    ref.backward()
    fp32.assert_close(a.grad, b.grad, terms=v)


def test_retempering_is_exact_for_the_renormalised_support(fp32):
    torch.manual_seed(3)
    n, v, k = 6, 50, 8
    s, t = torch.randn(n, v) * 3, torch.randn(n, v) * 3
    y = torch.randint(0, v, (n,))
    ids1, lp1, lt1 = _topk_targets(t, y, k, 1.0)  # a cache built at T = 1
    ids2, lp2, lt2 = _topk_targets(t, y, k, 2.5)  # ... and one built at T = 2.5
    assert torch.equal(ids1, ids2)  # top-k ids do not depend on T
    # Exact in exact arithmetic; in fp32 both caches are rounded, so each is checked against float64 truth.
    truth = torch.log_softmax(t.double().gather(1, ids1) / 2.5, -1)  # the support distribution at T = 2.5
    fp32.assert_close(retemper(lp1, 1.0, 2.5), truth, terms=k)
    fp32.assert_close(torch.log_softmax(lp2, -1), truth, terms=k)
    kd, scale = _renorm_kl64(s, ids1, truth, 2.5)
    from_t1 = sparse_kd_loss(s, ids1, lp1, lt1, y, tail="renorm", temperature=2.5, cache_temperature=1.0)
    direct = sparse_kd_loss(s, ids2, lp2, lt2, y, tail="renorm", temperature=2.5, cache_temperature=2.5)
    for loss in (from_t1.loss, direct.loss):
        assert loss.item() == fp32.approx(kd.mean().item(), terms=n * v, scale=scale.mean().item())
    # The tail mass cannot be re-tempered from the top-k alone: refused, with the fix in the message.
    with pytest.raises(DistilError, match="cannot be re-tempered"):
        sparse_kd_loss(s, ids1, lp1, lt1, y, tail="tail_term", temperature=2.5, cache_temperature=1.0)


def test_sparse_loss_checks_shapes_and_masks_everything():
    s = torch.randn(2, 3, 10, requires_grad=True)
    labels = torch.full((2, 3), -100)
    out = sparse_kd_loss(s, torch.zeros(0, 4, dtype=torch.long), torch.zeros(0, 4), torch.zeros(0), labels)
    out.loss.backward()
    assert out.loss.item() == 0.0 and out.n_tokens == 0 and torch.count_nonzero(s.grad) == 0
    with pytest.raises(DistilError, match="one target row per valid label"):
        sparse_kd_loss(s, torch.zeros(2, 4, dtype=torch.long), torch.zeros(2, 4), torch.zeros(2), labels)


# ----------------------------------------------------------------------------------------------------------------
# The cache on disk


def _write_cache_recipe(directory, tiny_teacher, name="c", **sections):
    """A cache recipe whose student is a random config init (no teacher weights needed to build it)."""
    base = {
        "name": name,
        "teacher": {"source": str(tiny_teacher)},
        "student": {"source": f"config:{tiny_teacher}", "config": {"num_hidden_layers": 1}},
        "data": {"source": "builtin:pydoc", "max_records": 12, "seq_len": 32, "eval_size": 4},
        "distill": {"method": "cache"},
        "cache": {"k": 16, "shard_tokens": 3000, "batch_size": 3},
        "train": {"steps": 3, "batch_size": 2, "lr": 1e-3, "warmup_steps": 1, "progress": False},
        "eval": {"enabled": False},
        "output": {"dir": str(directory / "runs"), "save_student": False},
    }
    for key, value in sections.items():
        merge = isinstance(base.get(key), dict) and key != "student"  # a student section replaces the default
        base[key] = {**base[key], **value} if merge else value
    path = directory / f"{name}.yaml"
    path.write_text(yaml.safe_dump(base))
    return path


@pytest.fixture
def cache_recipe(tmp_path, tiny_teacher):
    """Writes a cache recipe in this test's tmp_path: _make(name="c", **sections) -> its path."""

    def _make(name="c", **sections):
        return _write_cache_recipe(tmp_path, tiny_teacher, name, **sections)

    return _make


def _files(d):
    return {p.name: p.read_bytes() for p in sorted(d.iterdir())}


@pytest.fixture(scope="session")
def _built_cache(tmp_path_factory, tiny_teacher):
    """The default cache recipe's cache, built once per test run (the teacher's pass is what costs)."""
    recipe = load_recipe(_write_cache_recipe(tmp_path_factory.mktemp("cache"), tiny_teacher))
    return recipe, cache_for_recipe(recipe, echo=lambda *a: None).dir


@pytest.fixture
def shared_cache(_built_cache):
    """(recipe, cache dir) of the cache built once per run, for tests that only read it; a test that writes into
    it fails here (copy it to tmp_path first)."""
    recipe, cdir = _built_cache
    before = _files(cdir)
    yield recipe, cdir
    assert _files(cdir) == before, f"a test changed the shared cache {cdir}; copy it before changing it"


class Killed(Exception):
    pass


def test_interrupted_build_resumes_to_the_same_bytes_and_trains_without_a_teacher(cache_recipe, shared_cache,
                                                                                 monkeypatch):
    quiet = lambda *a, **k: None  # noqa: E731
    full = TeacherCache(shared_cache[1])  # built in one go, by another recipe file with the same content
    assert len(full.manifest["shards"]) >= 4 and full.manifest["complete"]
    assert full.manifest["ids_dtype"] == "uint16" and full.k == 16

    recipe = load_recipe(cache_recipe("b"))

    def kill_after_shard_1(i):
        if i == 1:
            raise Killed

    with pytest.raises(Killed):
        cache_for_recipe(recipe, echo=quiet, on_shard=kill_after_shard_1)
    cdir = default_dir(recipe)
    manifest = read_manifest(cdir)
    assert len(manifest["shards"]) == 2 and not manifest["complete"]
    # What a kill mid-write leaves: a temp file and a shard file the manifest does not list (garbage bytes).
    (cdir / ".tmp-shard-00002.safetensors").write_bytes(b"half")
    (cdir / "shard-00002.safetensors").write_bytes(b"half-written")
    with pytest.raises(DistilError, match="incomplete"):
        TeacherCache(cdir)  # an incomplete cache is never read

    resumed = cache_for_recipe(recipe, echo=quiet)
    assert resumed.manifest["complete"]
    assert _files(cdir) == _files(full.dir)  # byte for byte, manifest included

    # Train from the cache: the teacher must not be loaded.
    import distil.pipeline as pipeline

    def no_teacher(*a, **k):
        raise AssertionError("the teacher was loaded")

    monkeypatch.setattr(pipeline, "load_teacher", no_teacher)
    result = pipeline.run(recipe, echo=quiet)
    rows = [json.loads(ln) for ln in (result.run_dir / "metrics.jsonl").read_text().splitlines()]
    assert len(rows) == 3 and all(math.isfinite(r["loss"]) and r["kd"] > 0 for r in rows)


def test_a_listed_shard_that_is_truncated_is_refused(shared_cache, tmp_path):
    cdir = shutil.copytree(shared_cache[1], tmp_path / "cache")  # a private copy: this test damages it
    shard = cdir / TeacherCache(cdir).manifest["shards"][1]["file"]
    shard.write_bytes(shard.read_bytes()[:-10])
    with pytest.raises(DistilError, match="missing or truncated"):
        TeacherCache(cdir)


def test_cache_rows_match_the_teacher(shared_cache, tiny_teacher, fp32):
    from distil.data import load_examples
    from distil.models import load_model

    recipe, cdir = shared_cache
    cache = TeacherCache(cdir)
    t = load_model(str(tiny_teacher))
    train_ex, _ = load_examples(recipe.data, t.tokenizer, recipe.seed)
    picks = [0, 5, len(train_ex) - 1]
    batch = collate([train_ex[i] for i in picks], 0)
    with torch.no_grad():
        logits = t.model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    ids, lp, tail = _topk_targets(logits[:, :-1], batch["labels"][:, 1:], 16)
    c_ids, c_lp, c_tail = cache.rows(picks)
    assert c_ids.shape == ids.shape == (int((batch["labels"][:, 1:] != -100).sum()), 16)
    # The cache's teacher pass batched other examples together (other padding): the same logits to fp32 rounding,
    # so the ids are the top-k up to near-ties. Their log-probs here are the top-k values, in order.
    valid = batch["labels"][:, 1:] != -100
    full = torch.log_softmax(logits[:, :-1][valid].double(), -1)
    fp32.assert_close(full.gather(1, c_ids.long()), lp, terms=64)  # 64: the widest reduction in the model
    assert (c_ids == ids).float().mean() > 0.99
    torch.testing.assert_close(c_lp.float(), lp, atol=2e-3, rtol=1e-3)  # fp16: half an ulp is 2^-11 relative
    fp32.assert_close(c_tail, tail, terms=64)


def test_reuse_with_another_teacher_tokenizer_data_or_k_is_refused(cache_recipe, shared_cache, tmp_path, capsys):
    recipe, cdir = shared_cache  # refusals read it and must leave it as it is (checked by the fixture)
    shared = str(cdir)
    other = save_tiny_model(tmp_path / "other_teacher", seed=1, num_hidden_layers=4)
    bad = cache_recipe("x", teacher={"source": str(other)}, cache={"dir": shared})
    assert main(["cache", str(bad)]) == 2
    err = capsys.readouterr().err
    assert "made for teacher" in err and "this recipe's teacher is" in err and "delete it or set cache.dir" in err
    bad = cache_recipe("y", data={"max_records": 10}, cache={"dir": shared})
    assert main(["cache", str(bad)]) == 2
    assert "made for data builtin:pydoc" in capsys.readouterr().err
    bad = cache_recipe("z", cache={"dir": shared, "k": 8})
    assert main(["cache", str(bad)]) == 2
    assert "made with k=16, this recipe asks cache.k=8" in capsys.readouterr().err
    # Another tokenizer over the same examples (the library entry point).
    from distil.data import load_examples

    tok = char_tokenizer(extra_chars="é")
    train_ex, _ = load_examples(recipe.data, tok, recipe.seed)
    with pytest.raises(DistilError, match="made with tokenizer"):
        ensure_cache(recipe, train_ex, tok, echo=lambda *a: None)
    # And a run (method cache) with the mismatched teacher fails before writing its run directory.
    bad = cache_recipe("w", teacher={"source": str(other)}, student={"source": "teacher", "layers": [0]},
                       cache={"dir": shared})
    assert main(["run", str(bad)]) == 2
    assert "made for teacher" in capsys.readouterr().err
    assert not (tmp_path / "runs" / "w").exists()


def test_cli_cache_verb_and_bad_input(cache_recipe, tmp_path, capsys):
    path = cache_recipe()
    assert main(["cache", str(path)]) == 0
    out = capsys.readouterr().out
    assert "bytes/token" in out and "k=16" in out
    assert main(["cache", str(path)]) == 0  # complete: verified (sha256), nothing rebuilt
    assert main(["cache", str(tmp_path / "missing.yaml")]) == 2
    assert main(["cache", str(path), "cache.k=0"]) == 2
    assert "cache.k: expected a value > 0" in capsys.readouterr().err
    assert main(["cache", str(path), "cache.tail=bogus"]) == 2
    assert main(["cache", str(path), "cache.k=100000"]) == 2
    assert "at most the vocabulary size" in capsys.readouterr().err
    assert main(["validate", str(path), "distill.loss=jsd"]) == 2
    assert "method 'cache'" in capsys.readouterr().err
    assert main(["validate", str(path), "distill.temperature=2"]) == 2
    assert "cache.temperature: tail 'tail_term' needs" in capsys.readouterr().err
    assert main(["validate", str(path), "distill.temperature=2", "cache.tail=renorm"]) == 0
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "notes.txt").write_text("mine")
    assert main(["cache", str(path), f"cache.dir={foreign}"]) == 2
    assert "is not a distil teacher cache" in capsys.readouterr().err
    assert (foreign / "notes.txt").read_text() == "mine"
    assert main(["cache"]) == 2


def test_run_with_a_student_from_the_teacher_builds_the_cache_and_evaluates(cache_recipe, capsys):
    path = cache_recipe("e", student={"source": "teacher", "layers": [0, 3]}, eval={"enabled": True},
                        cache={"tail": "renorm"}, distill={"temperature": 2.0})
    assert main(["run", str(path)]) == 0
    run = path.parent / "runs" / "e"
    results = json.loads((run / "eval.json").read_text())["results"]
    assert "student (cache)" in results and math.isfinite(results["student (cache)"]["kl"])
    assert (path.parent / "runs" / "e-cache" / "manifest.json").is_file()
    shutil.rmtree(run)
    assert main(["run", str(path)]) == 0  # the cache is reused as is


def test_collate_adds_the_index_only_when_every_example_has_one():
    ex = [{"input_ids": [1, 2, 3], "labels": [1, 2, 3]}, {"input_ids": [4], "labels": [4]}]
    assert "index" not in collate(ex, 0)
    tagged = [{**e, "index": i + 7} for i, e in enumerate(ex)]
    assert collate(tagged, 0)["index"].tolist() == [7, 8]


def test_the_cache_loss_asks_the_model_for_the_shifted_logits_only(tiny_teacher, fp32):
    from distil.methods.cache import _shifted_logits
    from distil.methods.offline import shift
    from distil.models import load_model

    m = load_model(str(tiny_teacher)).model
    ids = torch.randint(0, 100, (2, 9))
    mask = torch.ones_like(ids)
    mask[1, 6:] = 0
    batch = {"input_ids": ids, "attention_mask": mask, "labels": ids.masked_fill(mask == 0, -100)}
    got, got_labels = _shifted_logits(m, batch, 100)
    want, want_labels = shift(m(input_ids=ids, attention_mask=mask).logits, batch["labels"], 100)
    fp32.assert_close(got, want, terms=64)  # 64: the widest reduction in the model (its MLP)
    assert torch.equal(got_labels, want_labels)


@pytest.mark.parametrize("tail,temperature,alpha,bias", [("tail_term", 1.0, 0.5, False), ("renorm", 2.0, 1.0, True)])
def test_the_cache_loss_is_the_same_fused_and_on_materialised_logits(cache_recipe, tmp_path, monkeypatch, tail,
                                                                      temperature, alpha, bias, fp32):
    import dataclasses

    import distil.methods.cache as cache_method
    from distil.data import load_examples
    from distil.methods.cache import build_cache, with_index
    from distil.models import load_model

    # prompt/response records of different lengths: masked prompts and padding, so valid rows are not all rows
    data = tmp_path / "qa.jsonl"
    data.write_text("".join(json.dumps({"prompt": "q" * (2 + i % 5) + str(i), "response": "answer " * (1 + i % 4)})
                            + "\n" for i in range(10)))
    recipe = load_recipe(cache_recipe("qa", data={"source": str(data), "chat_template": False, "eval_size": 2}))
    cdir = cache_for_recipe(recipe, echo=lambda *a: None).dir
    cache = TeacherCache(cdir, tail_mode=tail)
    student = load_model(recipe.teacher.source).model
    if bias:  # a head with a bias: its gradient must come out of the fused path too
        head = student.lm_head
        student.lm_head = torch.nn.Linear(head.in_features, head.out_features, bias=True)
        student.lm_head.weight.data.copy_(head.weight.data)
        torch.nn.init.normal_(student.lm_head.bias, std=0.5)
    train_ex, _ = load_examples(recipe.data, load_model(recipe.teacher.source).tokenizer, recipe.seed)
    batch = collate(with_index(train_ex)[:4], 0)
    assert (batch["labels"][:, 1:] == -100).any()  # the valid-row bookkeeping matters
    num_items = float((batch["labels"][:, 1:] != -100).sum())  # the global count: this batch is the whole step
    results = {}
    materialised = cache_method._shifted_logits
    for fused in (True, False):
        def shifted_logits(*a, fused=fused):
            assert not fused, "the fused path materialised the student's logits"
            return materialised(*a)

        monkeypatch.setattr(cache_method, "_shifted_logits", shifted_logits)
        spec = dataclasses.replace(recipe.distill, fused=fused, temperature=temperature, alpha=alpha, chunk_size=7)
        student.zero_grad(set_to_none=True)
        out = build_cache(cache, spec, cache.vocab_size)(student, batch, num_items)
        out.loss.backward()
        grads = {n: p.grad.clone() for n, p in student.named_parameters() if p.grad is not None}
        head = student.get_output_embeddings()  # may be tied to the input embeddings
        grads["head.weight"] = head.weight.grad.clone()
        if bias:
            grads["head.bias"] = head.bias.grad.clone()
        results[fused] = (out, grads)
    (f, fg), (p, pg) = results[True], results[False]
    assert f.n_tokens == p.n_tokens > 0
    # two fp32 computations of one loss: a few ulps of the summands' size, times sqrt(tokens x vocabulary) terms
    terms = int(f.n_tokens) * cache.vocab_size
    scale = sum(abs(float(getattr(p, name).detach())) for name in ("loss", "kd", "ce"))
    for name in ("loss", "kd", "ce"):
        fp32.assert_close(getattr(f, name), getattr(p, name), terms=terms, scale=scale, msg=name)
    assert fg.keys() == pg.keys()
    for name in fg:
        fp32.assert_close(fg[name], pg[name], terms=terms, msg=name)
