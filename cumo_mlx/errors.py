"""The errors cumo-mlx raises for problems a user can fix.

Every message reads "<what is wrong> (<what to do>)"; the CLI prints it as one line.
"""


class CuMoError(Exception):
    """A problem with the user's input, files or environment (exit code 2)."""

    exit_code = 2

    def __init__(self, what: str, fix: str | None = None):
        self.what = what
        self.fix = fix
        super().__init__(f"{what} ({fix})" if fix else what)


class ConfigError(CuMoError):
    """A config.json (or training config) that cannot describe a CuMo model."""


class CheckpointError(CuMoError):
    """Weights that are missing, unreadable, unsafe or do not match the config."""


class ImageError(CuMoError):
    """An image that cannot be read or used."""


class DataError(CuMoError):
    """A dataset file or sample that cannot be used for training."""
