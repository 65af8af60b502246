"""Checkpoints: every RNG per rank, durability (fsync, rename), kills mid-save and mid-prune, retiring
an abandoned timeline, and a corpus of bad checkpoint directories that must each give one line."""

import json
import os
import random
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file
from torch import nn

import distil.checkpoint as ck
import distil.rng as rng_mod
from distil.checkpoint import (capture_rng, gather_rng, list_checkpoints, load_checkpoint, resolve_resume,
                               retire_newer, save_checkpoint, truncate_metrics)
from distil.errors import DistilError


class Killed(BaseException):
    """Stands for SIGKILL: not an Exception, so no `except Exception` cleanup can run."""


def _model(hidden=8):
    return nn.Sequential(nn.Linear(4, hidden), nn.Dropout(0.5), nn.Linear(hidden, 3))


def _opt(model, groups=1):
    ps = list(model.parameters())
    if groups == 2:
        return torch.optim.AdamW([{"params": ps[:2]}, {"params": ps[2:]}], lr=1e-2, foreach=False)
    return torch.optim.AdamW(ps, lr=1e-2, foreach=False)


def _trained(seed=0, **kw):
    """A model and its optimizer after one step (so AdamW has moments to save)."""
    torch.manual_seed(seed)
    m = _model(**kw)
    o = _opt(m)
    m(torch.randn(5, 4)).pow(2).mean().backward()
    o.step()
    return m, o


def _weights(m):
    return {k: v.clone() for k, v in m.state_dict().items()}


def _same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _save(root, step, m=None, o=None, keep_last=10, **kw):
    if m is None:
        m, o = _trained(step)
    return save_checkpoint(root, step, m, o, {"tokens": step}, keep_last, **kw)


def _draws():
    """One value from every generator that can affect training, including the cached Gaussians."""
    m = _model().train()
    return (torch.rand(3).tolist(), m(torch.ones(2, 4)).tolist(), random.random(), random.gauss(0, 1),
            np.random.rand(), np.random.standard_normal())


def _scramble(seed=123):
    torch.manual_seed(seed)
    random.seed(seed)
    np.random.seed(seed)


# --- RNG ----------------------------------------------------------------------------------------

def test_every_rng_is_saved_and_restored(tmp_path):
    _scramble(7)
    random.gauss(0, 1)  # leaves a cached second Gaussian in `random` and in numpy's legacy state
    np.random.standard_normal()
    m, o = _trained(1)
    path = _save(tmp_path, 2, m, o)
    expected = _draws()
    _scramble()
    load_checkpoint(path, _model(), _opt(_model()))
    assert _draws() == expected


def test_each_rank_restores_its_own_states(tmp_path):
    per_rank = []
    for r in range(2):
        _scramble(100 + r)
        per_rank.append(capture_rng())
    path = _save(tmp_path, 2, rng_states=per_rank)
    keys = load_file(str(path / "rng.safetensors")).keys()
    assert {"rank0.cpu", "rank1.cpu", "rank0.python", "rank1.numpy"} <= set(keys)
    draws = {}
    for r in (1, 0):
        _scramble()
        load_checkpoint(path, _model(), _opt(_model()), rank=r)
        draws[r] = _draws()
        _scramble(100 + r)
        assert _draws() == draws[r]
    assert draws[0] != draws[1]


def test_a_rank_missing_from_the_checkpoint_gets_a_distinct_reproducible_seed(tmp_path):
    path = _save(tmp_path, 2)
    out = {}
    for r in (0, 2, 3, 3):
        _scramble()
        if r:
            with pytest.warns(UserWarning, match=f"no RNG state for rank {r}: seeding it from rank 0"):
                load_checkpoint(path, _model(), _opt(_model()), rank=r)
        else:
            load_checkpoint(path, _model(), _opt(_model()), rank=r)
        d = _draws()
        assert out.setdefault(r, d) == d  # same checkpoint + rank: same stream
    assert len({str(v) for v in out.values()}) == 3  # never a copy of another rank's stream


def test_old_checkpoints_with_only_a_cpu_state_still_load(tmp_path):
    torch.manual_seed(5)
    cpu = torch.get_rng_state()
    expected = torch.rand(3)
    path = _save(tmp_path, 2)
    save_file({"cpu": cpu}, str(path / "rng.safetensors"))  # the format before per-rank states
    for rank in (0, 1):  # every rank restored rank 0's state then
        _scramble()
        load_checkpoint(path, _model(), _opt(_model()), rank=rank)
        assert torch.equal(torch.rand(3), expected)


def test_gather_rng_unpacks_every_rank_in_order():
    _scramble(1)
    other = rng_mod._pack_rng(capture_rng())
    other_states = capture_rng()

    class TwoRanks:  # rank 0 of 2; rank 1's packed states are `other`
        num_processes, device = 2, torch.device("cpu")

        def gather(self, t):
            return torch.cat([t, other])

    _scramble(0)
    mine = capture_rng()
    got = gather_rng(TwoRanks())
    assert len(got) == 2
    for have, want in ((got[0], mine), (got[1], other_states)):
        assert have.keys() == want.keys() and all(torch.equal(have[k], want[k]) for k in want)
        assert all(have[k].dtype == want[k].dtype for k in want)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_cuda_rng_is_saved_and_restored(tmp_path):
    torch.cuda.manual_seed_all(3)
    path = _save(tmp_path, 2)
    assert "rank0.cuda0" in load_file(str(path / "rng.safetensors"))
    expected = torch.rand(4, device="cuda").tolist()
    torch.cuda.manual_seed_all(99)
    load_checkpoint(path, _model(), _opt(_model()))
    assert torch.rand(4, device="cuda").tolist() == expected


# --- durability ---------------------------------------------------------------------------------

def test_files_and_dirs_are_fsynced_around_the_rename(tmp_path, monkeypatch):
    events = []
    real_fsync, real_replace = os.fsync, os.replace
    monkeypatch.setattr(os, "fsync", lambda fd: (events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}"))),
                                                 real_fsync(fd))[1])
    monkeypatch.setattr(os, "replace", lambda a, b: (events.append(("replace", str(a), str(b))), real_replace(a, b))[1])
    _save(tmp_path, 2)
    root = os.path.realpath(tmp_path)
    tmp, final = f"{root}/.tmp-step-000002", f"{root}/step-000002"
    events = [(e[0], *(os.path.realpath(x) for x in e[1:])) for e in events]
    at = events.index(("replace", tmp, final))
    before = {e[1] for e in events[:at] if e[0] == "fsync"}
    assert {f"{tmp}/{n}" for n in ck.FILES} | {tmp} <= before
    assert events[at + 1] == ("fsync", root)  # the rename itself is made durable


def test_list_orders_by_step_number_and_hides_temporaries(tmp_path):
    for name in ("step-999999", "step-1000000", "step-000005", ".tmp-step-000007", ".del-step-000001",
                 "step-000006-copy", "superseded"):
        (tmp_path / name).mkdir()
        (tmp_path / name / "trainer_state.json").write_text('{"step": 1}')
    (tmp_path / "step-000009").mkdir()  # no completion marker
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-000005", "step-999999", "step-1000000"]


def test_saving_a_step_again_keeps_the_old_one_superseded(tmp_path, monkeypatch):
    m4, o4 = _trained(4)
    _save(tmp_path, 4, m4, o4)
    m, o = _trained(9)
    with monkeypatch.context() as mp:
        _kill_at_rename(mp)
        with pytest.raises(Killed):
            _save(tmp_path, 4, m, o)
    # killed between moving the old step-4 aside and renaming the new one: nothing lost, nothing half
    old = tmp_path / "superseded" / "step-000004.1"
    assert list_checkpoints(tmp_path) == [] and resolve_resume(str(old), tmp_path) == old
    path = _save(tmp_path, 4, m, o)
    for src, want in ((path, m), (old, m4)):
        got = _model()
        load_checkpoint(src, got, _opt(got))
        assert _same(_weights(got), _weights(want))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-000004", "superseded"]


def test_keep_last_never_prunes_the_checkpoint_just_written(tmp_path):
    for step in (2, 4, 6):
        _save(tmp_path, step, keep_last=2)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-000004", "step-000006"]
    _save(tmp_path, 3, keep_last=1)  # out of order (a resume that did not retire newer ones)
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-000003", "step-000006"]


# --- kills (task: a kill -9 at any point leaves the previous checkpoint intact and listed) ------

def _kill_in_optimizer_write(monkeypatch):
    import safetensors.torch as st

    real = st.save_file

    def half_then_die(tensors, filename, metadata=None):
        if filename.endswith("optimizer.safetensors"):
            data = st.save(tensors)
            with open(filename, "wb") as f:
                f.write(data[: len(data) // 2])
            raise Killed
        return real(tensors, filename, metadata=metadata)

    monkeypatch.setattr(st, "save_file", half_then_die)


def _kill_at_rename(monkeypatch):
    real = os.replace

    def die(a, b):
        if os.path.basename(a).startswith(".tmp-"):
            raise Killed
        return real(a, b)

    monkeypatch.setattr(os, "replace", die)


def _kill_mid_prune(monkeypatch):
    def die(path, *a, **kw):  # deletes one file, then the process dies (the reported bug's state)
        os.unlink(os.path.join(path, "optimizer.safetensors"))
        raise Killed

    monkeypatch.setattr(shutil, "rmtree", die)


@pytest.mark.parametrize("kill,listed,leftover", [
    (_kill_in_optimizer_write, ["step-000002"], ".tmp-step-000004"),
    (_kill_at_rename, ["step-000002"], ".tmp-step-000004"),
    (_kill_mid_prune, ["step-000004"], ".del-step-000002"),
])
def test_kill_during_save_keeps_previous_and_next_save_cleans_up(tmp_path, monkeypatch, kill, listed, leftover):
    m2, o2 = _trained(2)
    _save(tmp_path, 2, m2, o2, keep_last=1)
    with monkeypatch.context() as mp:
        kill(mp)
        with pytest.raises(Killed):
            _save(tmp_path, 4, keep_last=1)
    assert [p.name for p in list_checkpoints(tmp_path)] == listed
    assert (tmp_path / leftover).is_dir()
    latest = resolve_resume("latest", tmp_path)
    assert latest.name == listed[-1]
    got = _model()
    load_checkpoint(latest, got, _opt(got))
    if listed == ["step-000002"]:
        assert _same(_weights(got), _weights(m2))
    _save(tmp_path, 6, keep_last=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-000006"]


def test_sigkill_between_write_and_rename(tmp_path):
    """A real kill -9 (no finally, no atexit) at the rename of the new checkpoint."""
    script = textwrap.dedent(f"""
        import os, signal, sys, torch
        sys.path.insert(0, {str(Path(ck.__file__).parents[1])!r})
        from pathlib import Path
        from distil.checkpoint import save_checkpoint
        torch.manual_seed(0)
        m = torch.nn.Sequential(torch.nn.Linear(4, 8), torch.nn.Dropout(0.5), torch.nn.Linear(8, 3))
        o = torch.optim.AdamW(m.parameters(), foreach=False)
        root = Path({str(tmp_path)!r})
        save_checkpoint(root, 2, m, o, {{}}, 1)
        real = os.replace
        os.replace = lambda a, b: os.kill(os.getpid(), signal.SIGKILL) if ".tmp-" in str(a) else real(a, b)
        save_checkpoint(root, 4, m, o, {{}}, 1)
    """)
    proc = subprocess.run([sys.executable, "-c", script], env={**os.environ, "OMP_NUM_THREADS": "1"},
                          capture_output=True, text=True, timeout=120)
    assert proc.returncode == -signal.SIGKILL, proc.stderr[-2000:]
    assert sorted(os.listdir(tmp_path / ".tmp-step-000004")) == sorted(ck.FILES)  # written, never renamed
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-000002"]
    assert resolve_resume("latest", tmp_path).name == "step-000002"
    _save(tmp_path, 6, keep_last=1)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["step-000006"]


# --- resuming from an older checkpoint ------------------------------------------------------------

def test_retire_newer_moves_an_abandoned_timeline_aside(tmp_path):
    for step in (2, 4, 6, 8):
        _save(tmp_path, step)
    (tmp_path / "step-000010").mkdir()  # an incomplete one from the same timeline goes too
    moved = retire_newer(tmp_path, 4)
    assert [p.relative_to(tmp_path).as_posix() for p in moved] == [
        "superseded/step-000006.1", "superseded/step-000008.1", "superseded/step-000010.1"]
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-000002", "step-000004"]
    assert resolve_resume("latest", tmp_path).name == "step-000004"
    resolve_resume(str(tmp_path / "superseded/step-000008.1"), tmp_path)  # kept whole, resumable by path
    _save(tmp_path, 6, keep_last=2)  # the new timeline; pruning ignores superseded/
    assert [p.name for p in list_checkpoints(tmp_path)] == ["step-000004", "step-000006"]
    assert retire_newer(tmp_path, 4)[0].name == "step-000006.2"  # retired twice: numbered, never overwritten
    assert retire_newer(tmp_path, 4) == []
    assert sorted(p.name for p in (tmp_path / "superseded").iterdir()) == [
        "step-000006.1", "step-000006.2", "step-000008.1", "step-000010.1"]


def test_truncate_metrics_drops_later_steps_and_a_torn_last_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    path.write_text('{"step": 1}\n{"step": 2}\n{"step": 3}\n{"step": 4, "lo')
    truncate_metrics(path, 2)
    assert path.read_text() == '{"step": 1}\n{"step": 2}\n'
    path.write_text('{"step": 1}\nnot json\n{"step": 3}\n')
    with pytest.raises(DistilError, match=r"metrics.jsonl: line 2: expected a JSON object"):
        truncate_metrics(path, 2)


# --- bad checkpoint directories: each one DistilError line naming the file ------------------------

def _cut_half(p):
    p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])


def _rewrite_state(text):
    return lambda d: (d / "trainer_state.json").write_text(text)


BAD_DIRS = {
    "is-a-file": (lambda d: (shutil.rmtree(d), d.write_text("x")), "",
                  "expected a checkpoint directory .* found a file"),
    "state-not-json": (_rewrite_state("{step: 4"), "trainer_state.json", "found unparseable text"),
    "state-without-step": (_rewrite_state('{"tokens": 4}'), "trainer_state.json", 'found no "step" key'),
    "state-step-a-string": (_rewrite_state('{"step": "4"}'), "trainer_state.json", 'found "step": "4"'),
    "state-a-list": (_rewrite_state("[4]"), "trainer_state.json", r"found \[4\]"),
    "state-missing": (lambda d: (d / "trainer_state.json").unlink(), "", "missing trainer_state.json"),
    "model-cut-in-half": (lambda d: _cut_half(d / "model.safetensors"), "model.safetensors", "truncated"),
    "model-absurd-header-length": (lambda d: (d / "model.safetensors").write_bytes(b"\xff" * 8 + b"{}"),
                                   "model.safetensors", "corrupt safetensors file: header length 1844674407"),
    "model-empty": (lambda d: (d / "model.safetensors").write_bytes(b""), "model.safetensors",
                    "not a safetensors file: 0 bytes"),
    "model-header-garbage": (lambda d: (d / "model.safetensors").write_bytes((4).to_bytes(8, "little") + b"\x00{[}"),
                             "model.safetensors", "corrupt safetensors header"),
    "optimizer-cut-in-half": (lambda d: _cut_half(d / "optimizer.safetensors"), "optimizer.safetensors",
                              "truncated"),
    "groups-not-groups": (lambda d: (d / "optimizer_groups.json").write_text('{"param_groups": 3}'),
                          "optimizer_groups.json", "expected"),
    "rng-missing": (lambda d: (d / "rng.safetensors").unlink(), "", "missing rng.safetensors"),
}


@pytest.mark.parametrize("case", sorted(BAD_DIRS))
def test_bad_checkpoint_directory_is_one_line(tmp_path, case):
    spoil, file, pattern = BAD_DIRS[case]
    path = _save(tmp_path, 4)
    spoil(path)
    for attempt in (lambda: resolve_resume(str(path), tmp_path),
                    lambda: load_checkpoint(path, _model(), _opt(_model()))):
        with pytest.raises(DistilError, match=pattern) as err:
            attempt()
        msg = str(err.value)
        assert "\n" not in msg and msg.startswith(str(path / file) if file else str(path)), msg


def _rng_without_cpu(d):
    save_file({"rank0.python": torch.zeros(3, dtype=torch.int64)}, str(d / "rng.safetensors"))


def _wrong_moment_shape(d):
    t = load_file(str(d / "optimizer.safetensors"))
    t["0.exp_avg"] = torch.zeros(2, 2)
    save_file(t, str(d / "optimizer.safetensors"))


MISMATCHES = {
    "wider-model": (lambda: _model(hidden=9), 1, "model.safetensors",
                    r"does not match the model: 0.bias is \[8\] in the file, \[9\] in the model \(and 2 more\)"),
    "deeper-model": (lambda: nn.Sequential(*_model(), nn.Linear(3, 3)), 1, "model.safetensors",
                     r"does not match the model: missing 3.bias \(and 1 more\)$"),
    "shallower-model": (lambda: nn.Sequential(nn.Linear(4, 8)), 1, "model.safetensors",
                        r"does not match the model: unexpected 2.bias \(and 1 more\)$"),
    "two-param-groups": (_model, 2, "optimizer_groups.json", r"expected 2 parameter group\(s\) .*, found 1"),
    "moment-shape": (_model, 1, "optimizer.safetensors", r"0.exp_avg is \[2, 2\], its parameter is \[8, 4\]"),
    "rng-without-cpu": (_model, 1, "rng.safetensors", "no rank0.cpu"),
    "rng-bad-state": (_model, 1, "rng.safetensors", r"unusable RNG state \(RuntimeError"),
}


@pytest.mark.parametrize("case", sorted(MISMATCHES))
def test_checkpoint_not_matching_model_or_optimizer_is_one_line_and_changes_nothing(tmp_path, case):
    make, groups, file, pattern = MISMATCHES[case]
    path = _save(tmp_path, 4)
    if case == "rng-without-cpu":
        _rng_without_cpu(path)
    if case == "rng-bad-state":  # a CPU generator state of the wrong size
        save_file({"rank0.cpu": torch.zeros(5, dtype=torch.uint8)}, str(path / "rng.safetensors"))
    if case == "moment-shape":
        _wrong_moment_shape(path)
    model = make()
    opt = _opt(model, groups)
    before, opt_before = _weights(model), json.dumps(opt.state_dict()["param_groups"])
    rng_before = torch.get_rng_state()
    with pytest.raises(DistilError, match=pattern) as err:
        load_checkpoint(path, model, opt)
    assert "\n" not in str(err.value) and str(err.value).startswith(str(path / file))
    assert _same(_weights(model), before) and json.dumps(opt.state_dict()["param_groups"]) == opt_before
    assert not opt.state and torch.equal(torch.get_rng_state(), rng_before)


def test_tied_weights_round_trip(tmp_path):
    m = _model()
    m[2].weight = nn.Parameter(torch.randn(3, 8))
    m.add_module("head", nn.Linear(8, 3, bias=False))
    m.head.weight = m[2].weight  # stored once by safetensors; must not count as missing
    o = _opt(m)
    path = save_checkpoint(tmp_path, 1, m, o, {}, 1)
    got = _model()
    got[2].weight = nn.Parameter(torch.zeros(3, 8))
    got.add_module("head", nn.Linear(8, 3, bias=False))
    got.head.weight = got[2].weight
    load_checkpoint(path, got, _opt(got))
    assert torch.equal(got.head.weight, m.head.weight)
