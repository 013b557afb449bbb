"""The `cumo-mlx` command line (installed as cumo_mlx.cli)."""
