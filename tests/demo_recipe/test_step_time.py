"""demo_recipe/step_time.py: a training step against its bare forward+backward, as a user runs it."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
from cumo_mlx.models.config import ModelArgs
from step_time import cumo_7b_config

SCRIPT = Path(__file__).resolve().parents[2] / "demo_recipe" / "step_time.py"


@pytest.mark.parametrize("flags", [[], ["--no-compile", "--dense"]])
def test_step_time_reports_the_step_and_its_bare_pass(flags):
    command = [sys.executable, str(SCRIPT), "--steps", "1", "--batch-size", "2", "--json", *flags]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr
    result = json.loads(done.stdout)
    assert result["compiled_update"] == ("--no-compile" not in flags)
    assert result["model"] == ("dense" if "--dense" in flags else "moe") and result["widths"] == "demo"
    assert result["step_s"] > 0 and result["forward_backward_s"] > 0
    assert result["overhead"] == pytest.approx(result["step_s"] / result["forward_backward_s"] - 1)


def test_cumo_7b_widths():
    args = ModelArgs.from_dict(cumo_7b_config(moe=True, llm_layers=1, vision_layers=2))
    assert (args.text_config.hidden_size, args.text_config.intermediate_size, args.text_config.num_hidden_layers) == (4096, 14336, 1)
    vision = args.vision_config
    assert (vision.hidden_size, vision.intermediate_size, vision.image_size, vision.num_hidden_layers) == (1024, 4096, 336, 2)
    assert args.scales == [1, 3] and args.clip_smoe and args.connector_is_moe
