"""How the command line fails: a `CdfslError` or a parse error is one `error:` line and exit 2; Ctrl-C says what is
kept (exit 130); anything else is a bug, shown with its traceback (exit 1)."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from functools import wraps
from typing import Any, TypeVar

import typer
from rich.markup import escape
from typer.core import TyperGroup

from cdfsl.cli.output import console, shown
from cdfsl.errors import CdfslError

try:  # typer 0.2x carries its own copy of click; older releases use click itself
    from typer._click import exceptions as click_errors
except ImportError:  # pragma: no cover
    from click import exceptions as click_errors  # type: ignore[no-redef]

INTERRUPTED = "interrupted; nothing more was done (a run's stored episodes are kept: the same command resumes it)"

F = TypeVar("F", bound=Callable[..., Any])


class CdfslGroup(TyperGroup):
    """The root `cdfsl` group. A parse error anywhere below it (an unknown option or command, a value of the wrong
    type, a missing option) is one `error:` line and exit 2, like every other refusal, instead of click's usage box;
    Ctrl-C says that finished episodes are kept. Every help text is printed as written: typer reads help as rich
    markup, which would swallow a `[word]` such as `cdfsl[tensorboard]`."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        _escape_help(self)

    def make_context(self, *args: Any, **kwargs: Any) -> Any:
        with _one_line_usage_errors():
            return super().make_context(*args, **kwargs)

    def invoke(self, ctx: Any) -> Any:
        with _one_line_usage_errors():
            try:
                return super().invoke(ctx)
            except KeyboardInterrupt:
                console.print(INTERRUPTED)
                raise typer.Exit(130) from None


def _escape_help(command: Any) -> None:
    """Escape the rich markup in the help texts of `command`, its parameters and every command below it."""
    for holder in (command, *command.params):
        for field in ("help", "short_help", "epilog"):
            text = getattr(holder, field, None)
            if isinstance(text, str):
                setattr(holder, field, escape(text))
    for sub in getattr(command, "commands", {}).values():
        _escape_help(sub)


@contextmanager
def _one_line_usage_errors() -> Iterator[None]:
    try:
        yield
    except click_errors.ClickException as error:
        if type(error).__name__ == "NoArgsIsHelpError":  # a group called alone: its help is the answer
            raise
        console.print(f"[red]error:[/red] {escape(shown(usage_error_line(error)))}", highlight=False, soft_wrap=True)
        raise typer.Exit(error.exit_code) from None


def usage_error_line(error: Any) -> str:
    """A click parse error (unknown option or command, bad or missing value) as one line that says what to do: the
    rejected value, when click's message does not quote it, and the command whose `--help` lists the options."""
    message = " ".join(error.format_message().split()).rstrip(".")
    # typer checks values with pydantic, whose message ("Input should be a valid integer") omits the value
    errors = getattr(error.__cause__, "errors", None)
    items = errors() if callable(errors) else []
    given = repr(str(items[0]["input"])) if items and "input" in items[0] else None
    if given is not None and given not in message:
        message += f" (got {given})"
    ctx = getattr(error, "ctx", None)
    if ctx is not None:
        message += f" (see `{ctx.command_path} --help`)"
    return message[:1].lower() + message[1:]


def user_errors(function: F) -> F:
    """Turn `CdfslError` into a one-line message and exit code 2; show warnings as one line each."""

    @wraps(function)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        def show(message: Warning | str, category: type[Warning], *_: Any, **__: Any) -> None:
            text = escape(shown(message))
            console.print(f"[yellow]warning:[/yellow] {text}", highlight=False, soft_wrap=True)

        warnings.showwarning = show  # type: ignore[assignment]
        try:
            return function(*args, **kwargs)
        except CdfslError as error:
            console.print(f"[red]error:[/red] {escape(shown(error))}", highlight=False, soft_wrap=True)
            raise typer.Exit(2) from None

    return wrapper  # type: ignore[return-value]
