"""Student samples from llama.cpp: the student being trained, run as a GGUF snapshot (on-policy distillation on CPU).

On a CPU, llama.cpp runs a small model's forward pass several times faster than transformers, and on-policy steps
are mostly sampling. So the student is exported (distil's own exporter, `export/gguf.py`) every `every` optimizer
steps to `<dir>/student-<step>.gguf`, and the samples of the steps in between come from that snapshot: weights up to
`every - 1` steps old (the staleness, reported per step as `snapshot_age`).

llama.cpp only runs the forward pass, with its KV cache (the prompt once, then one token at a time); the SAMPLING is
distil's own - `hf.filter_logits` (temperature, top-k, top-p, min-p) and one torch generator per row seeded exactly
as the transformers backend seeds it - so:
  - a row's sample depends on its seed and the snapshot's weights only (not on its batch-mates or the backend's
    own sampler chain), and the F32 snapshot samples what transformers would sample from the same weights
    (tests/test_snapshot.py compares them);
  - log q(x_t), the log-probability of each sampled token under the SAMPLING policy (snapshot weights, sampling
    temperature and filters), is known exactly; the sampled-token estimator's importance ratio
    p_S(x_t; current weights) / q(x_t) then corrects for the snapshot's staleness (methods/onpolicy.py).
Divergence losses (forward/reverse KL, JSD) score the sampled text with the current student's full distributions,
so stale samples only change which text is scored, not the loss's meaning.

Resume: the snapshot of step s is made at the start of step s (before that step's update), kept until the next
one replaces it, and reused by a resumed run whose step lies in its block: the resumed run samples what the
uninterrupted one sampled. A run killed between a checkpoint and the next export finds the older file and
re-exports at the block start it resumes into (the weights there are the checkpoint's: the same as uninterrupted).
"""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path
from typing import Any

import numpy as np
import torch

from distil.errors import DistilError
from distil.generation.params import GenParams

QUANTS = ("F32", "F16")


class GGUFSnapshot:
    """The trained student as a GGUF in llama.cpp, re-exported every `every` steps (see the module docstring)."""

    def __init__(self, root: str | Path, every: int, tokenizer: Any, quant: str = "F32",
                 threads: int | None = None):
        if every < 1:
            raise DistilError(f"snapshot: every: expected an integer >= 1, found {every!r}")
        if quant not in QUANTS:
            raise DistilError(f"snapshot: quant: expected one of {', '.join(QUANTS)}, found {quant!r}")
        from distil.generation.llamacpp import require

        require()  # one line telling how to install llama-cpp-python, before any training
        self.root, self.every, self.tokenizer, self.quant, self.threads = Path(root), every, tokenizer, quant, threads
        self.step: int | None = None  # the step whose weights the loaded snapshot holds
        self.model: Any = None  # generation.llamacpp.LlamaCppModel

    def path(self, step: int) -> Path:
        return self.root / f"student-{step:07d}.gguf"

    def ensure(self, model: Any, step: int, main: bool = True, wait: Any = None) -> int:
        """Load the snapshot of this step's block (`step - step % every`), exporting `model` first when that file is
        missing (on the main process; the others wait, then load the same file). Returns the snapshot's step."""
        block = step - step % self.every
        if self.step == block and self.model is not None:
            return block
        path = self.path(block)
        if main and not path.is_file():
            self._export(model, path)
            for old in self.root.glob("student-*.gguf"):  # only the newest snapshot is kept
                if old != path:
                    old.unlink(missing_ok=True)
        if wait is not None:
            wait()
        from distil.generation.llamacpp import LlamaCppModel

        if self.model is not None:
            self.model.close()
        self.model = LlamaCppModel(path, n_threads=self.threads or torch.get_num_threads())
        self.step = block
        return block

    def _export(self, model: Any, path: Path) -> None:
        from distil.export import export_gguf

        self.root.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=".snapshot-", dir=self.root))
        try:
            was_training = model.training
            model.save_pretrained(tmp, safe_serialization=True)
            model.train(was_training)
            self.tokenizer.save_pretrained(tmp)
            export_gguf(tmp, path, self.quant, modelfile=False, workers=1)  # atomic: complete or absent
        finally:
            shutil.rmtree(tmp, ignore_errors=True)

    def sample(self, prompts: list[list[int]], params: GenParams, seeds: list[int], eos: list[int]
               ) -> tuple[list[list[int]], list[list[float]], list[bool]]:
        """(completions, log q of each completion token, truncated) for each prompt: a completion holds the tokens up
        to and including its first EOS, or max_new_tokens of them (truncated)."""
        from distil.generation.hf import RowSampler, filter_logits

        if self.model is None:
            raise DistilError("snapshot: sample() before ensure(): no student snapshot is loaded")
        llm = self.model.llm
        completions, logqs, truncated = [], [], []
        for prompt, seed in zip(prompts, seeds):
            self.model.ensure_context(len(prompt) + params.max_new_tokens)
            llm = self.model.llm
            n_vocab = llm.n_vocab()
            sampler = None if params.greedy else RowSampler(params, [seed])
            llm.reset()  # every row starts from an empty KV cache (its sample must not depend on the previous row)
            llm.eval(list(prompt))
            row: list[int] = []
            lq: list[float] = []
            done = False
            for _ in range(params.max_new_tokens):
                # the last evaluated position's logits (llama.cpp keeps only those when logits_all is off)
                logits = torch.from_numpy(np.ctypeslib.as_array(llm._ctx.get_logits(), shape=(n_vocab,)).copy())
                scores = logits[None].float()
                if sampler is None:
                    token, logq = int(scores.argmax(-1)), 0.0
                else:
                    token = int(sampler(None, scores).argmax(-1))
                    logq = float(filter_logits(scores, params).log_softmax(-1)[0, token].double())
                row.append(token)
                lq.append(logq)
                if token in eos:
                    done = True
                    break
                llm.eval([token])
            completions.append(row)
            logqs.append(lq)
            truncated.append(not done)
        return completions, logqs, truncated

    def close(self) -> None:
        if self.model is not None:
            self.model.close()
            self.model = None
