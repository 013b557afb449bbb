"""Benchmark evaluation (`cumo-mlx eval`): CuMo's benchmarks, asked as CuMo's eval scripts ask them and
scored as the official scripts score them.

One module per benchmark (textvqa, gqa, scienceqa, pope, mme, mmbench, seed, vqav2, mmvet, custom,
shapes) holds its files, questions and scorer; tasks.py lists them; answers.py is the answers file;
run.py the answering loop a generation engine plugs into; answerers.py the engines (a local model, an
OpenAI-compatible server); distributed.py the split over `mlx.launch` ranks; report.py the table,
metrics file and chart of `cumo-mlx eval` (cli/eval.py).
"""

from .answers import AnswersWriter, read_answers, remaining, resume_answers
from .question import Question
from .result import Result
from .run import run_task
from .tasks import TASKS, get_task, questions, score, write_upload

__all__ = [
    "TASKS",
    "AnswersWriter",
    "Question",
    "Result",
    "get_task",
    "questions",
    "read_answers",
    "remaining",
    "resume_answers",
    "run_task",
    "score",
    "write_upload",
]
