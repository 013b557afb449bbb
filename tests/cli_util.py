"""Run the `cumo-mlx` command in-process, as a user would, through click's CliRunner isolation, or on
two ranks under `mlx.launch --backend ring` on localhost."""

import random
import shutil
import socket
import subprocess
import sys
from pathlib import Path

from click.testing import CliRunner

from cumo_mlx.cli.main import main


def run_cli(*args) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of `cumo-mlx ARGS` with the CLI's own error handling."""
    with CliRunner().isolation() as (stdout, stderr, _):
        code = main([str(a) for a in args])
        sys.stdout.flush()  # print() output (the trainer's messages) stays buffered otherwise
        sys.stderr.flush()
    return code, stdout.getvalue().decode(), stderr.getvalue().decode()


def assert_one_error_line(code: int, stderr: str, expected_code: int = 2) -> str:
    """A user error: the given exit code and exactly one `error: ...` line on stderr."""
    lines = stderr.strip().splitlines()
    assert code == expected_code, stderr
    assert len(lines) == 1 and lines[0].startswith("error: "), stderr
    return lines[0]


def installed(command: str) -> str | None:
    """The path of a console script, this interpreter's own first."""
    return shutil.which(command, path=str(Path(sys.executable).parent)) or shutil.which(command)


LAUNCH = installed("mlx.launch")


def free_ports() -> int:
    """A port p with p and p + 1 free (the ring backend listens on one port per rank)."""
    for _ in range(50):
        port = random.randint(20000, 60000)
        try:
            with socket.socket() as a, socket.socket() as b:
                a.bind(("127.0.0.1", port))
                b.bind(("127.0.0.1", port + 1))
            return port
        except OSError:
            continue
    raise RuntimeError("no free ports")


def launch_two_ranks(*command) -> str:
    """stdout of `mlx.launch --backend ring -n 2 COMMAND` on localhost; it must succeed."""
    argv = [LAUNCH, "--backend", "ring", "-n", "2", "--starting-port", str(free_ports()), *map(str, command)]
    result = subprocess.run(argv, capture_output=True, text=True, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    return result.stdout
