"""`cumo-mlx fuse`: merge trained LoRA adapters into a full model directory."""

from pathlib import Path

import click


@click.command()
@click.option("--model", required=True, help="The base model the adapters were trained on (directory or hub id).")
@click.option("--adapter-path", required=True, type=click.Path(file_okay=False, path_type=Path), help="The training --output.")
@click.option("--mlx-path", "--save-path", "mlx_path", required=True, type=click.Path(file_okay=False, path_type=Path), help="Output model directory.")
@click.option("--dequantize", is_flag=True, help="Write a float model even when the base is quantized.")
@click.option("--force", is_flag=True, help="Write over an existing --mlx-path.")
def fuse(model, adapter_path, mlx_path, dequantize, force):
    """Write base model + adapters as one model directory that every command loads."""
    from cumo_mlx.loader import load_model, resolve_model_path, save
    from cumo_mlx.paths import check_output
    from cumo_mlx.train.lora import fuse as fuse_model
    from cumo_mlx.train.lora import load_adapters, stored_dtype

    base = resolve_model_path(model)
    check_output(mlx_path, base, adapter_path, force=force, option="--mlx-path")
    fused, _ = load_model(base, dtype=stored_dtype(base))
    load_adapters(fused, adapter_path)
    fuse_model(fused, dequantize_all=dequantize)
    save(mlx_path, fused, tokenizer_source=base)
    click.echo(f"wrote {mlx_path}" + (" (dequantized)" if dequantize else ""))
