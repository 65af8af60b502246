"""The methods: each one is one file with one `Method` (distil/methods/contract.py), registered here by the
name a recipe uses in `distil.method`. A recipe names a method, never an import path.

Adding a method: write `distil/methods/<name>.py` ending in `METHOD = Method(...)`, add one line below, add a
recipe and tests (docs/design.md, "Adding a method in one file"). `pipeline.run` and the training loop do not
change.
"""

from distil.methods import (born_again, cache, cot, crosstok, features, hard_labels, mutual, offline, onpolicy,
                            preference, prune, ptq, qat, seqkd, sparse, synthetic, takd)
from distil.methods.contract import Context, Method, Phase, Stage, Trainable, count_targets, unwrap  # noqa: F401

# Recipe `distill.method` name -> Method.
METHODS: dict[str, Method] = {m.name: m for m in (
    offline.METHOD, hard_labels.METHOD, cache.METHOD,  # response-based, from live logits or a cache
    features.METHOD,  # feature-based: hidden states and attention maps through hooks
    born_again.METHOD, mutual.METHOD,  # self-distillation (Born-Again), online distillation (mutual learning)
    takd.METHOD,  # teacher-assistant chain (capacity gap)
    seqkd.METHOD, synthetic.METHOD, cot.METHOD,  # the teacher writes the data
    onpolicy.METHOD, preference.METHOD,  # the student writes, the teacher judges
    crosstok.METHOD,  # logits across tokenizers (ULD, GOLD-style alignment)
    prune.METHOD, sparse.METHOD, ptq.METHOD, qat.METHOD,  # compression, recovered by distillation
)}

# The loss-function builders (builder(teacher_or_cache, distill_spec, vocab) -> loss_fn), for tests and benchmarks.
from distil.methods.cache import build_cache  # noqa: E402,F401
from distil.methods.hard_labels import build_hard_labels  # noqa: E402,F401
from distil.methods.offline import build_offline  # noqa: E402,F401
