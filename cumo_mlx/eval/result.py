"""A benchmark's score: the task, how many questions it covers and the metrics."""

from dataclasses import dataclass, field
from typing import Sequence

from ..errors import CuMoError


@dataclass(frozen=True)
class Result:
    """metrics are in percent (0-100), except MME's scores (sums of percentages, as MME reports them);
    per-category figures are under metrics["categories"]. Tasks scored by an outside grader (vqav2,
    mmvet) and `custom` have no metrics."""

    task: str
    count: int
    metrics: dict = field(default_factory=dict)

    def to_json(self) -> dict:
        return {"task": self.task, "count": self.count, "metrics": self.metrics}


def percent(hits: Sequence[float]) -> float:
    """100 x the mean of `hits` (booleans or scores in [0, 1])."""
    if not hits:
        raise CuMoError("there is no question to score", "answer some of the task's questions first")
    return 100 * (sum(hits) / len(hits))  # the official fraction, then in percent
