"""Scoring the demo's one-word answers to the shapes questions (questions.json records).

The rules live in the package, which scores the `shapes` task of `cumo-mlx eval` with them.
"""

from cumo_mlx.eval.shapes import accuracy_by_type, is_correct, normalise_answer

__all__ = ["accuracy_by_type", "is_correct", "normalise_answer"]
