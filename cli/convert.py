"""`cumo-mlx convert`: a PyTorch CuMo checkpoint (hub id or directory) to an MLX model directory."""

import shlex
import sys

import click


@click.command(context_settings={"help_option_names": ["-h", "--help"]})
@click.option(
    "--hf-path",
    "--model",
    "hf_path",
    required=True,
    help="Hub id (e.g. shi-labs/CuMo-mistral-7b) or local checkpoint directory.",
)
@click.option(
    "--mlx-path", default="mlx_model", show_default=True, help="Output directory (must not exist unless --force)."
)
@click.option("-q", "--quantize", is_flag=True, help="Quantize the LLM (linears, embedding, Mixtral experts).")
@click.option(
    "--q-bits",
    type=click.Choice(["2", "3", "4", "6", "8"]),
    default=None,
    help="Bits per weight when quantizing (with -q). Default: 4.",
)
@click.option(
    "--q-group-size",
    type=click.Choice(["32", "64", "128"]),
    default=None,
    help="Quantization group size (with -q). Default: 64.",
)
@click.option(
    "--dtype",
    type=click.Choice(["float16", "bfloat16", "float32"]),
    default=None,
    help="Dtype of the float weights. Default: config.json's torch_dtype, else the checkpoint's own.",
)
@click.option("--upload-repo", default=None, help="Hub repo to upload the converted model to.")
@click.option("--revision", default=None, help="Branch, tag or commit of the hub checkpoint.")
@click.option(
    "--vision-tower",
    default=None,
    metavar="PATH_OR_ID",
    help="CLIP directory or hub id overriding config.json's mm_vision_tower.",
)
@click.option(
    "--quantize-vision/--no-quantize-vision",
    default=None,
    help="With -q: quantize the vision tower and connector at --vision-bits (the default), or keep them as floats.",
)
@click.option(
    "--vision-bits",
    type=click.Choice(["2", "3", "4", "6", "8"]),
    default=None,
    help="Bits per weight of the vision tower and connector (with -q). Default: 8.",
)
@click.option("--force", is_flag=True, help="Replace an existing --mlx-path (only once the new one is complete).")
@click.option("--no-progress", is_flag=True, help="No progress bars.")
def convert(
    hf_path,
    mlx_path,
    quantize,
    q_bits,
    q_group_size,
    dtype,
    upload_repo,
    revision,
    vision_tower,
    quantize_vision,
    vision_bits,
    force,
    no_progress,
):
    """Convert an original CuMo checkpoint (safetensors or .bin) to MLX, optionally quantized.

    With -q the LLM is quantized at --q-bits (4), the vision tower and connector at --vision-bits
    (8) unless --no-quantize-vision. Routers (CLIP, connector, Mixtral) are never quantized, nor
    layers whose input size is not a multiple of the group size. Writing is atomic: DST appears
    only when complete.
    """
    from cumo_mlx.convert.convert import convert as run

    command = (
        "cumo-mlx " + " ".join(shlex.quote(a) for a in sys.argv[1:] if a != "--debug")
        if sys.argv[1:2] == ["convert"]
        else None
    )
    summary = run(
        hf_path,
        mlx_path,
        quantize=quantize,
        q_bits=None if q_bits is None else int(q_bits),
        q_group_size=None if q_group_size is None else int(q_group_size),
        dtype=dtype,
        upload_repo=upload_repo,
        revision=revision,
        vision_tower=vision_tower,
        quantize_vision=quantize_vision,
        vision_bits=None if vision_bits is None else int(vision_bits),
        force=force,
        progress=not no_progress,
        command=command,
    )
    click.echo(summary.line())
