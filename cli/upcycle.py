"""`cumo-mlx upcycle`: a dense CuMo (stage 2) to the MoE CuMo that stage 3 trains."""

from pathlib import Path

import click


@click.command()
@click.option("--model", required=True, help="Dense model directory (MLX layout) or hub id.")
@click.option("--mlx-path", required=True, type=click.Path(file_okay=False, path_type=Path), help="Output model directory.")
@click.option("--num-experts", default=4, show_default=True, type=click.IntRange(1, 256), help="Experts per MoE block.")
@click.option("--top-k", default=2, show_default=True, type=click.IntRange(1, 256), help="Experts each token goes to.")
@click.option("--no-vision", is_flag=True, help="Keep the CLIP MLPs dense.")
@click.option("--no-connector", is_flag=True, help="Keep the mlp2x_gelu connector dense.")
@click.option("--seed", default=0, show_default=True, type=click.IntRange(0), help="Seed of the fresh routers.")
@click.option("--force", is_flag=True, help="Write over an existing --mlx-path.")
def upcycle(model, mlx_path, num_experts, top_k, no_vision, no_connector, seed, force):
    """Turn dense CLIP MLPs and the mlp2x_gelu connector into MoE blocks whose experts all start as
    copies of the dense MLP, with freshly initialised routers (outputs unchanged at step 0)."""
    from cumo_mlx.loader import load_model, resolve_model_path, save
    from cumo_mlx.paths import check_output
    from cumo_mlx.train.lora import stored_dtype
    from cumo_mlx.train.upcycle import upcycle as upcycle_model

    source = resolve_model_path(model)
    check_output(mlx_path, source, force=force, option="--mlx-path")
    dense, _ = load_model(source, dtype=stored_dtype(source))
    moe = upcycle_model(dense, num_experts, top_k, vision=not no_vision, connector=not no_connector, seed=seed)
    save(mlx_path, moe, tokenizer_source=source)
    sites = [name for name, done in (("CLIP", moe.args.clip_smoe), ("connector", moe.args.connector_is_moe)) if done]
    click.echo(f"wrote {mlx_path}: {', '.join(sites)} as {num_experts}-expert top-{top_k} MoE")
