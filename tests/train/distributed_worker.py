"""Run on every rank by tests/test_distributed.py under `mlx.launch`: `cumo-mlx <argv>`, then save
this rank's trained weights to OUTPUT/rank{r}-of-{n}.safetensors (test scaffolding: the trainer
itself writes only on rank 0)."""

import sys

import cumo_mlx  # noqa: F401  (the optimized BLAS before mlx)
import mlx.core as mx
from cumo_mlx.cli.main import main
from cumo_mlx.train.trainer import Trainer
from mlx.utils import tree_flatten

run = Trainer.run


def run_and_save_weights(self, *args, **kwargs):
    result = run(self, *args, **kwargs)
    self.out.mkdir(parents=True, exist_ok=True)
    weights = dict(tree_flatten(self.model.trainable_parameters()))
    mx.save_safetensors(str(self.out / f"rank{self.rank}-of-{self.size}.safetensors"), weights)
    return result


Trainer.run = run_and_save_weights
sys.exit(main(sys.argv[1:]))
