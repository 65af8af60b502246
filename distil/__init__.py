"""distil: knowledge distillation of language models, from a teacher to a small student that
llama.cpp and Ollama run.

    from distil import load_recipe, run
    result = run(load_recipe("recipes/demo.yaml", ["train.steps=10"]))
"""

from distil.errors import DistilError
from distil.recipe import Recipe, load_recipe

__version__ = "0.1.0"


def run(recipe, **kwargs):
    """Run every stage a recipe names (see `distil.pipeline.run`)."""
    from distil.pipeline import run as _run

    return _run(recipe, **kwargs)


def evaluate(*args, **kwargs):
    """Held-out perplexity, top-1 agreement and KL(teacher || student) (see `distil.eval.metrics`)."""
    from distil.eval.metrics import evaluate as _evaluate

    return _evaluate(*args, **kwargs)


def distill(*args, **kwargs):
    """Distil any nn.Module pair through the training loop (see `distil.api.distill`; also api.born_again, api.mutual)."""
    from distil.api import distill as _distill

    return _distill(*args, **kwargs)


def born_again(*args, **kwargs):
    """Self-distillation: Born-Again generations of one architecture (see `distil.api.born_again`)."""
    from distil.api import born_again as _born_again

    return _born_again(*args, **kwargs)


def mutual(*args, **kwargs):
    """Online distillation: deep mutual learning between peers (see `distil.api.mutual`)."""
    from distil.api import mutual as _mutual

    return _mutual(*args, **kwargs)


def export_gguf(*args, **kwargs):
    """Write a GGUF file (see `distil.export.export_gguf`)."""
    from distil.export import export_gguf as _export

    return _export(*args, **kwargs)


__all__ = ["DistilError", "Recipe", "load_recipe", "run", "distill", "born_again", "mutual", "evaluate", "export_gguf",
           "__version__"]
