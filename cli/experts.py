"""`cumo-mlx experts`: how a dataset's tokens spread over the experts of every MoE layer."""

import json
from pathlib import Path

import click
from cumo_mlx.errors import CuMoError
from cumo_mlx.paths import check_output


@click.command()
@click.option("--model", "model_path", required=True, help="MLX model directory (or `demo`).")
@click.option("--data", "data_path", required=True, type=click.Path(path_type=Path), help="LLaVA-format JSON dataset.")
@click.option(
    "--image-folder",
    type=click.Path(path_type=Path),
    default=None,
    help="Folder the dataset's image paths are relative to (default: the data file's folder).",
)
@click.option("--out", "out_path", type=click.Path(path_type=Path), default=None, help="Write a PNG heatmap (layer x expert).")
@click.option("--json", "json_path", type=click.Path(path_type=Path), default=None, help="Write the counts and shares as JSON.")
@click.option("--max-samples", type=click.IntRange(1), default=None, help="Use only the first N samples.")
@click.option("--batch-size", type=click.IntRange(1), default=16, show_default=True, help="Images per forward pass.")
@click.option(
    "--template",
    type=click.Choice(["auto", "mistral_instruct_system", "plain"]),
    default="auto",
    show_default=True,
    help="Prompt template for the LLM's MoE layers (auto: plain for caption-only data).",
)
@click.option("--progress/--no-progress", default=None, help="Progress bar (default: when stderr is a terminal).")
@click.option("--force", is_flag=True, help="Write over existing --out and --json files.")
def experts(model_path, data_path, image_folder, out_path, json_path, max_samples, batch_size, template, progress, force):
    """Route statistics: the share of (token, top-k) assignments each expert of each MoE layer
    (CLIP layers, connector, Mixtral layers) receives over a dataset. Prints a table; writes a PNG
    heatmap with --out and the numbers with --json. The model's outputs are not changed."""
    from cumo_mlx.loader import load
    from cumo_mlx.plots import heatmap
    from cumo_mlx.routes import count_routes
    from cumo_mlx.train.data import read_records

    for option, path in (("--out", out_path), ("--json", json_path)):
        if path is None:
            continue
        if path.is_dir() or not path.parent.exists():
            raise CuMoError(f"{option} {path}: {'is a directory' if path.is_dir() else 'its folder does not exist'}", "give a file path in an existing folder")
        check_output(path, data_path, force=force, option=option)
    read_records(data_path)  # a missing or broken data file fails before the model loads
    if image_folder is None:
        image_folder = data_path.parent
    elif not image_folder.is_dir():
        raise CuMoError(f"--image-folder {image_folder} is not a folder", "give the folder the image paths are relative to")
    model, processor = load(model_path)
    report = lambda message: click.echo(message, err=True)  # noqa: E731
    stats = count_routes(model, processor, data_path, image_folder, batch_size, template, max_samples, progress, report)
    click.echo(stats.table())
    if out_path is not None:
        grid = heatmap(stats, out_path, title=f"expert share per MoE layer: {Path(str(model_path)).name}, {stats.samples} samples")
        click.echo(f"wrote {out_path} ({grid['rows']} layers x {grid['cols']} experts)")
    if json_path is not None:
        record = {"model": str(model_path), "data": str(data_path), **stats.to_dict()}
        json_path.write_text(json.dumps(record, indent=2) + "\n")
        click.echo(f"wrote {json_path}")
