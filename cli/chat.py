"""`cumo-mlx chat`: a multi-turn conversation about images, one KV cache across turns."""

import click

from .generate import generation_options, model_options, start, text_stdin

HELP = "Type a message. /image PATH adds an image to your next message, /reset starts over, /exit quits."


def read_line(interactive: bool):
    """The next line typed, or None at the end of input (Ctrl-D, or Ctrl-C at the prompt)."""
    try:
        return input(">> " if interactive else "")
    except (EOFError, KeyboardInterrupt):
        return None


@click.command()
@model_options
@generation_options
@click.option("--verbose/--quiet", default=False, show_default=True, help="Print stats on stderr after each answer.")
def chat(model, images, system, seed, verbose, **flags):
    """Chat about images: the --image(s) go with your first message.

    \b
    /image PATH|URL  add an image to your next message
    /reset           start a new conversation (the --image(s) go with its first message again)
    /exit            quit (or Ctrl-D)
    Ctrl-C stops an answer; the conversation keeps what was said.
    """
    from cumo_mlx.errors import CuMoError
    from cumo_mlx.generate import ChatSession, format_stats
    from cumo_mlx.processor import load_image

    pictures = [load_image(image) for image in images]
    model, processor, system, options = start(model, system, seed, flags)
    session = ChatSession(model, processor, system, max_kv_size=options.max_kv_size)
    for picture in pictures:
        session.add_image(picture)
    interactive = text_stdin().isatty()
    if interactive:
        click.echo(HELP, err=True)

    while (line := read_line(interactive)) is not None:
        command, _, argument = line.strip().partition(" ")
        try:
            if not line.strip():
                continue
            if command in ("/exit", "/quit"):
                break
            if command == "/reset":
                session.reset()
                for picture in pictures:  # the images the chat was started with belong to every conversation
                    session.add_image(picture)
                again = f"; the {len(pictures)} --image image(s) go with your next message" if pictures else ""
                click.echo(f"(the conversation is reset{again})", err=True)
            elif command == "/image":
                if not argument.strip():
                    raise CuMoError("/image needs an image", "type /image PATH or /image URL")
                session.add_image(argument.strip().strip("'\""))
            elif command.startswith("/"):
                raise CuMoError(f"unknown command {command}", "use /image PATH, /reset or /exit")
            else:
                response, answer = None, session.stream(line, options=options)
                try:
                    for response in answer:
                        click.echo(response.text, nl=False)
                except KeyboardInterrupt:
                    answer.close()  # keeps what was answered so far in the conversation
                    click.echo()
                    click.echo("(interrupted)", err=True)
                    continue
                click.echo()
                if verbose and response is not None:
                    click.echo(format_stats(response, 0), err=True)
        except CuMoError as e:
            click.echo(f"error: {e}", err=True)
