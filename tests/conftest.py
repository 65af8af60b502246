"""Test-wide settings: one torch thread, offline hub, fixed seeds, quiet logs."""

import os

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("TRANSFORMERS_VERBOSITY", "error")
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture(scope="session")
def tiny_teacher(tmp_path_factory):
    """A random 4-layer tiny Llama with a character tokenizer, saved as a HF directory."""
    from distil.testing import save_tiny_model

    return save_tiny_model(tmp_path_factory.mktemp("teacher"), seed=0, num_hidden_layers=4)


@pytest.fixture
def make_recipe(tmp_path, tiny_teacher):
    """Write a small recipe YAML (sections merged over tiny defaults); returns its path."""
    import yaml

    def _make(**sections):
        base = {
            "name": "t",
            "teacher": {"source": str(tiny_teacher)},
            "student": {"source": "teacher", "layers": [0, 3]},
            "data": {"source": "builtin:pydoc", "max_records": 12, "seq_len": 32, "eval_size": 4},
            "train": {"steps": 4, "batch_size": 2, "lr": 1e-3, "warmup_steps": 1, "progress": False},
            "eval": {"enabled": False},
            "output": {"dir": str(tmp_path / "runs")},
        }
        for key, value in sections.items():
            if isinstance(value, dict) and isinstance(base.get(key), dict):
                base[key] = {**base[key], **value}
            else:
                base[key] = value
        path = tmp_path / "recipe.yaml"
        path.write_text(yaml.safe_dump(base))
        return path

    return _make


class Fp32Tolerance:
    """Tolerances at fp32 precision that hold on every x86-64 kernel set.

    torch picks its CPU kernels at start-up (ATEN_CPU_CAPABILITY=default / avx2 / avx512; MKL its own), so two
    fp32 computations of the same value, or one compared with a float64 reference, agree to a few units in the
    last place (ulps), not bit for bit. The allowed error is `ulps` fp32 ulps of the magnitude compared, times
    sqrt(terms) for a value that sums `terms` rounded contributions (rounding errors add like a random walk).
    `scale` is the magnitude of the summands when the result can be much smaller than they are (cancellation,
    values near 0); by default it is |expected| (approx) or max |expected| over the tensor (assert_close).
    Exact comparisons stay for the same computation run twice in one process (determinism, resume).
    """

    eps = torch.finfo(torch.float32).eps  # 1.19e-7: one ulp at 1.0

    def rel(self, ulps: float = 8, terms: int = 1) -> float:
        return ulps * self.eps * max(terms, 1) ** 0.5

    def approx(self, expected, *, ulps: float = 8, terms: int = 1, scale: float | None = None):
        rel = self.rel(ulps, terms)
        return pytest.approx(expected, rel=rel, abs=rel * (scale or 0.0))

    def assert_close(self, actual, expected, *, ulps: float = 8, terms: int = 1, scale: float | None = None,
                     msg=None):
        """Elementwise |a - e| <= rel * (|e| + scale), compared in float64 (so a float64 reference is welcome)."""
        a = torch.as_tensor(actual).detach().double()
        e = torch.as_tensor(expected).detach().double()
        finite = torch.isfinite(e)
        if scale is None:
            scale = float(e[finite].abs().max()) if finite.any() else 0.0
        rel = self.rel(ulps, terms)
        torch.testing.assert_close(a, e, rtol=rel, atol=rel * scale, msg=msg)


@pytest.fixture(scope="session")
def fp32():
    """fp32-precision tolerances, the same on every x86-64 CPU (see Fp32Tolerance)."""
    return Fp32Tolerance()
