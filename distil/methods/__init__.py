"""Methods: each one decides where the training targets come from and returns a loss function
for THE training loop (`distil.trainer.train`). A method never owns a loop.

A loss function has the signature `loss_fn(student, batch, num_items) -> LossOutput`, where
`num_items` is the number of target tokens in the global batch (all accumulation micro-batches
and all processes), so every method reduces its loss the same way.
"""

from distil.methods.cache import build_cache
from distil.methods.offline import build_hard_labels, build_offline

# Recipe `distill.method` name -> builder(teacher_model_or_None, distill_spec, vocab_size).
# `cache` takes an opened `TeacherCache` (methods/cache.py: `ensure_cache`) in place of the teacher model.
METHODS = {
    "offline": build_offline,
    "hard_labels": build_hard_labels,
    "cache": build_cache,
}

# Whether training needs the teacher model in memory. `cache` loads it only to build a missing cache.
NEEDS_TEACHER = {"offline": True, "hard_labels": False, "cache": False}
