"""Run the `cumo-mlx` command in-process, as a user would, through click's CliRunner isolation."""

import sys

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
