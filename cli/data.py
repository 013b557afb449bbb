"""`cumo-mlx data`: generate datasets. `cumo-mlx data shapes` renders the synthetic shapes set."""

from pathlib import Path

import click

from cumo_mlx.errors import CuMoError
from cumo_mlx.paths import check_output


@click.group(invoke_without_command=True)
@click.pass_context
def data(ctx):
    """Generate training and evaluation datasets."""
    if ctx.invoked_subcommand is None:
        raise click.UsageError(f"name a dataset: {', '.join(sorted(data.commands))}", ctx)


@data.command()
@click.option("--out", "out", required=True, type=click.Path(path_type=Path), help="Output folder (created; pass it as --image-folder).")
@click.option("--count", default=1000, show_default=True, type=click.IntRange(1, 10_000_000), help="Number of images.")
@click.option("--seed", default=0, show_default=True, type=click.IntRange(0), help="Random seed: same seed, same dataset.")
@click.option(
    "--multi-turn",
    default=0.15,
    show_default=True,
    type=click.FloatRange(0, 1),
    help="Share of instruction samples with 2 to --max-turns question turns.",
)
@click.option("--max-turns", default=3, show_default=True, type=click.IntRange(1, 8), help="Most question turns in a multi-turn sample.")
@click.option(
    "--follow-ups",
    default="shape,colour,count,exists,largest",
    show_default=True,
    help="Comma-separated question types of the turns after the first.",
)
@click.option("--progress/--no-progress", default=None, help="Progress bar (default: when stderr is a terminal).")
@click.option("--force", is_flag=True, help="Write into an --out that already holds files.")
def shapes(out: Path, count: int, seed: int, multi_turn: float, max_turns: int, follow_ups: str, progress, force: bool):
    """Render a synthetic dataset of coloured shapes with captions and one-word questions.

    Writes OUT/images/*.png, OUT/pretrain.json (stage-1 captions, `plain` style),
    OUT/captions.json (the captions as instructions, for pre-finetuning), OUT/instruct.json
    (instructions), OUT/questions.json (every one-word question with its
    type, for per-type accuracy) and OUT/scenes.json (what was drawn). Image paths are relative to
    OUT. Answers are one lowercase word; counts are words (one, two, three).
    """
    from cumo_mlx.shapes import QUESTION_TYPES, write_dataset

    follow_up_types = tuple(kind.strip() for kind in follow_ups.split(","))
    if unknown := [kind for kind in follow_up_types if kind not in QUESTION_TYPES]:
        raise CuMoError(f"--follow-ups: unknown question type {unknown[0]!r}", f"choose from {','.join(QUESTION_TYPES)}")
    if not 0 <= multi_turn <= 1:  # FloatRange lets nan through
        raise CuMoError(f"--multi-turn must be in [0, 1], got {multi_turn}", "give a share between 0 and 1")
    if out.exists() and not out.is_dir():
        raise CuMoError(f"--out {out} is a file", "give a folder")
    check_output(out, force=force)
    try:
        summary = write_dataset(
            out, count, seed=seed, multi_turn=multi_turn, progress=progress, max_turns=max_turns, follow_ups=follow_up_types
        )
    except OSError as e:
        raise CuMoError(f"cannot write the dataset to {out}: {e.strerror or e}", "check the path, its permissions and free space") from None
    types = ", ".join(f"{kind} {n}" for kind, n in summary["question_types"].items())
    click.echo(
        f"wrote {summary['images']} images to {out} in {summary['seconds']:.1f} s: "
        f"pretrain.json and captions.json {summary['pretrain']} captions each, instruct.json {summary['instruct']} samples "
        f"({summary['multi_turn']} multi-turn), questions.json {summary['questions']} questions ({types})"
    )
