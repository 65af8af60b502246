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
