"""`cumo-mlx eval`: a benchmark of CuMo's paper, asked as CuMo's eval scripts ask it and scored as the
official scripts score it (cumo_mlx/eval/). Several processes or Macs: `mlx.launch -n N cumo-mlx eval ...`.
"""

import json
from pathlib import Path

import click
from cumo_mlx.errors import CuMoError
from cumo_mlx.eval.tasks import TASKS

GRADERS = {
    "vqav2": "the VQAv2 test-dev upload of EvalAI (eval.ai/web/challenges/challenge-page/830)",
    "mmvet": "MM-Vet's GPT-4 grader (github.com/yuweihao/MM-Vet)",
}


def check_options(model, server, api_key, output, answers, resume) -> None:
    """One way to get answers: a model or a server answering into --output, or an --answers file."""
    if answers is not None:
        given = [flag for flag, value in (("--model", model), ("--server", server), ("--output", output), ("--resume", resume)) if value]
        if given:
            raise click.UsageError(f"--answers scores an existing file: leave out {', '.join(given)}")
        return
    if model is None and server is None:
        raise click.UsageError("give --model (or --server) and --output to answer the questions, or --answers to score a file")
    if output is None:
        raise click.UsageError("--output ANSWERS.jsonl is required to answer the questions")
    if output.is_dir():
        raise CuMoError(f"--output {output} is a folder", "give the answers file's path, e.g. answers/textvqa.jsonl")
    if api_key is not None and server is None:
        raise click.UsageError("--api-key is for --server")


def progress_bar(total: int, show, engine):
    """tqdm on stderr with the ETA and the engine's tokens/s; `show` None: when stderr is a terminal."""
    from tqdm import tqdm

    class Bar(tqdm):
        def update(self, n=1):
            elapsed = self.format_dict["elapsed"]
            if elapsed > 0:
                self.set_postfix_str(f"{engine.tokens / elapsed:.1f} tok/s", refresh=False)
            return super().update(n)

    return Bar(total=total, desc="answering", unit="q", disable=None if show is None else not show)


def answer(task, data_dir, model, server, api_key, output, limit, batch_size, resume, progress) -> bool:
    """Answers the questions into `output` (on every rank of an `mlx.launch` run); True where the
    answers file is then whole (rank 0)."""
    import cumo_mlx
    import mlx.core as mx
    from cumo_mlx.eval.answerers import ModelAnswerer, ServerAnswerer
    from cumo_mlx.eval.distributed import answer_in_parts
    from cumo_mlx.eval.run import pending, run_task

    server_engine = None if server is None else ServerAnswerer(server, api_key, model)

    def answer_share(path, share, answered):
        left = sum(1 for _ in pending(task, data_dir, path, limit, resume, share, answered))  # reads the files first
        engine = server_engine or (ModelAnswerer(*cumo_mlx.load(model)) if left else None)  # no load for none
        todo = run_task(task, data_dir, path, engine, model or server, batch_size, limit, resume, share, answered)
        with progress_bar(left, progress if share[0] == 0 else False, engine) as bar:
            for _ in todo:
                bar.update()

    return answer_in_parts(mx.distributed.init(), task, data_dir, output, resume, answer_share)


def report(task: str, data_dir: Path, answers: Path, limit, as_json: bool) -> None:
    """Scores the answers file (or writes the outside grader's file): the table and the files written
    on stderr, the result as JSON on stdout with --json."""
    from cumo_mlx.eval import score, write_upload
    from cumo_mlx.eval.report import beside, format_table, write_results

    result = score(task, data_dir, answers, limit)
    spec = TASKS[task]
    if spec.upload is not None:
        upload = write_upload(task, data_dir, answers, beside(answers, "upload.json"))
        click.echo(f"{task}: {result.count} answers in {answers}; for {GRADERS[task]}: {upload}", err=True)
    elif spec.score is None:
        click.echo(f"{task}: {result.count} answers in {answers} (no score: {task} has no ground truth)", err=True)
    else:
        metrics, chart = write_results(result, answers)
        click.echo(format_table(result), err=True)
        click.echo(f"answers: {answers}\nmetrics: {metrics}\nchart: {chart}", err=True)
    if as_json:
        click.echo(json.dumps(result.to_json()))


@click.command("eval")
@click.option("--task", required=True, type=click.Choice(list(TASKS)), help="The benchmark.")
@click.option("--data-dir", required=True, type=click.Path(path_type=Path),
              help="LLaVA's playground/data/eval folder (its eval.zip and each benchmark's files), or the task's folder.")  # fmt: skip
@click.option("--model", default=None, help="An MLX model directory, a hub id or `demo`; with --server, the served model's name.")
@click.option("--server", default=None, metavar="URL",
              help="Ask an OpenAI-compatible server (POST URL/v1/chat/completions) instead of a local model.")  # fmt: skip
@click.option("--api-key", default=None, help="Send `Authorization: Bearer KEY` to --server.")
@click.option("--output", type=click.Path(path_type=Path), default=None, help="The answers file to write (LLaVA's JSON lines).")
@click.option("--answers", type=click.Path(path_type=Path), default=None, help="Score this answers file (no model).")
@click.option("--limit", type=click.IntRange(1), default=None, help="Only the task's first N questions.")
@click.option("--batch-size", type=click.IntRange(1), default=8, show_default=True, help="Questions answered together.")
@click.option("--resume", is_flag=True, help="Keep the answers --output holds and answer only the rest.")
@click.option("--progress/--no-progress", default=None, help="Progress bar (default: when stderr is a terminal).")
@click.option("--json", "as_json", is_flag=True, help="Print the result as one JSON object, the last line of stdout.")
def evaluate(task, data_dir, model, server, api_key, output, answers, limit, batch_size, resume, progress, as_json):
    """Answer a benchmark's questions with --model (greedy, batched) into --output, then score them as
    the official scripts do: the per-category table on stderr, ANSWERS.metrics.json and a chart
    ANSWERS.metrics.png beside the answers (vqav2 and mmvet: ANSWERS.upload.json for their outside
    grader; custom: answers only). --answers scores an existing answers file.

    \b
    cumo-mlx eval --task textvqa --model shi-labs/CuMo-mistral-7b \\
        --data-dir playground/data/eval --output answers/textvqa.jsonl
    mlx.launch -n 2 cumo-mlx eval ...      each process answers its share; rank 0 merges and scores
    """
    check_options(model, server, api_key, output, answers, resume)
    if answers is None:
        if not answer(task, data_dir, model, server, api_key, output, limit, batch_size, resume, progress):
            return  # another rank merges and scores
        answers = output
    report(task, data_dir, answers, limit, as_json)
