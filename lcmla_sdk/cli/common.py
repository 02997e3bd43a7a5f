"""What every ``lcmla`` command shares: the application, the error console and its one-line errors, help texts."""

from __future__ import annotations

import typer
from rich.console import Console

from ..defaults import MODES

# Plain help (click's layout): switches show as switches, not with a "<bool>" value.
app = typer.Typer(
    add_completion=False, no_args_is_help=True, rich_markup_mode=None, help="LCM-Lookahead face personalization for SDXL."
)
console = Console(stderr=True)


# Set by --debug: errors then raise with their traceback instead of printing one line.
SETTINGS = {"debug": False}
FACES_HELP = (
    "Face backend: 'auto' (the model's insightface pack, else dlib), 'dlib[:cnn][,68]', 'insightface:DIR' or DIR, "
    "'none' (no detection)."
)
HUB_HELP = " A local path, or hf://OWNER/NAME[/PATH] to fetch from the Hugging Face Hub (cached; docs/WEIGHTS.md)."
MODE_HELP = f"'quality' (DPM-Solver++, {MODES['quality']} steps) or 'fast' (LCM, {MODES['fast']} steps)."
DTYPES = ("float32", "bfloat16", "float16")  # names of the torch dtypes the SDK runs in (lcmla_sdk.validation.DTYPES)
# Errors a user can fix (bad arguments, bad or unreadable files); every LcmlaError derives from ValueError.
USER_ERRORS = (ValueError, TypeError, OSError)


@app.callback()
def main(debug: bool = typer.Option(False, "--debug", help="Show tracebacks of errors.")) -> None:
    """LCM-Lookahead face personalization for SDXL."""
    SETTINGS["debug"] = debug


def fail(error: Exception) -> typer.Exit:
    """One clear line on stderr and exit code 2 (re-raised with its traceback under --debug)."""
    if SETTINGS["debug"]:
        raise error
    console.print(f"error: {error}", soft_wrap=True, highlight=False, markup=False)
    return typer.Exit(code=2)


def command_group(name: str, help: str) -> typer.Typer:
    """The subcommands ``lcmla NAME ...``; without a subcommand the group shows its help."""
    group = typer.Typer(no_args_is_help=True, help=help)
    app.add_typer(group, name=name)
    return group

