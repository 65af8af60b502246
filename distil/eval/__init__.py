"""Evaluation: held-out metrics (perplexity, agreement, KL to the teacher) and their report."""

from distil.eval.metrics import evaluate, format_table

__all__ = ["evaluate", "format_table"]
