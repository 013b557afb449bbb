"""Converting PyTorch CuMo checkpoints to MLX (installed as cumo_mlx.convert)."""
