"""`cumo-mlx`: the command group and the one error style every command shares.

Errors a user can fix (a full disk and a refused permission too) print one line,
`error: <what is wrong> (<what to do>)`, and exit with 2; anything else is an internal failure (exit 1). `--debug` anywhere on the line shows the traceback.
"""

import errno
import importlib
import os
import sys
import traceback

import click

from cumo_mlx.errors import CuMoError

# OS errors that come from the user's environment (disk, permissions, paths), not from a bug.
ENVIRONMENT_ERRORS = {
    errno.ENOSPC: "free some disk space",
    errno.EDQUOT: "free some disk space",
    errno.EACCES: "check the permissions",
    errno.EPERM: "check the permissions",
    errno.EROFS: "choose a writable place",
    errno.ENOTDIR: "a part of the path is a file, not a folder: check the path",
    errno.EISDIR: "give a file, not a folder",
    errno.ENAMETOOLONG: "use a shorter path",
}

# Subcommands load their modules only when run, so `cumo-mlx --help` stays fast.
COMMANDS = {
    "generate": "cumo_mlx.cli.generate:generate",
    "chat": "cumo_mlx.cli.chat:chat",
    "convert": "cumo_mlx.cli.convert:convert",
    "train": "cumo_mlx.cli.train:train",
    "upcycle": "cumo_mlx.cli.upcycle:upcycle",
    "fuse": "cumo_mlx.cli.fuse:fuse",
    "data": "cumo_mlx.cli.data:data",
    "experts": "cumo_mlx.cli.experts:experts",
    "serve": "cumo_mlx.cli.serve:serve",
    "eval": "cumo_mlx.cli.eval:evaluate",
}


class LazyGroup(click.Group):
    def list_commands(self, ctx):
        return sorted(COMMANDS)

    def get_command(self, ctx, name):
        if name not in COMMANDS:
            return None
        module, attribute = COMMANDS[name].split(":")
        return getattr(importlib.import_module(module), attribute)


@click.group(cls=LazyGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="cumo-mlx")
def cli():
    """CuMo vision-language models in MLX. Add --debug to any command to see tracebacks."""


def report(message: str, code: int) -> int:
    message = " ".join(line.strip() for line in message.splitlines() if line.strip())  # one line, always
    click.echo(f"error: {message}", err=True)
    return code


def main(argv=None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    debug = "--debug" in argv or os.environ.get("CUMO_MLX_DEBUG") == "1"
    argv = [a for a in argv if a != "--debug"]
    try:
        cli.main(args=argv, prog_name="cumo-mlx", standalone_mode=False)
        return 0
    except click.exceptions.Exit as e:
        return e.exit_code
    except (KeyboardInterrupt, click.exceptions.Abort):
        return report("interrupted", 130)
    except click.UsageError as e:
        if debug:
            traceback.print_exc()
        command = e.ctx.command_path if e.ctx else "cumo-mlx"
        return report(f"{e.format_message()} (see `{command} --help`)", 2)
    except CuMoError as e:
        if debug:
            traceback.print_exc()
        return report(str(e), e.exit_code)
    except BrokenPipeError:
        return 0
    except Exception as e:  # the environment (disk, permissions), else an internal failure
        if debug:
            traceback.print_exc()
        if isinstance(e, OSError) and e.errno in ENVIRONMENT_ERRORS:
            where = f"{e.filename}: " if e.filename else ""
            return report(f"{where}{e.strerror} ({ENVIRONMENT_ERRORS[e.errno]})", 2)
        return report(
            f"internal error: {type(e).__name__}: {e} (rerun with --debug and report the traceback)",
            1,
        )


def entry_point():
    sys.exit(main())
