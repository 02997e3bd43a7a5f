"""The ``lcmla`` command line.

Only typer and rich are imported here; each command imports what it needs (torch, diffusers, ...) when it runs, so
``lcmla --help`` and every ``--help`` answer at once. The commands are registered below in the order help lists them.
"""

from __future__ import annotations

from .common import app, command_group
from .generation import generate, identity_create
from .models import convert, info
from .performance import bench, export
from .serving import demo, serve_command
from .training import data_generate, data_merge, evaluate, train

__all__ = ["app"]

app.command()(generate)
app.command()(bench)
app.command()(export)
app.command("eval")(evaluate)
app.command()(train)
app.command("serve")(serve_command)
identity_group = command_group("identity", "Encode faces once into reusable identity files.")
identity_group.command("create")(identity_create)
app.command()(convert)
app.command()(info)
data_group = command_group("data", "The paper's synthetic identity set, made with SDXL-Turbo.")
data_group.command("generate")(data_generate)
data_group.command("merge")(data_merge)
app.command()(demo)
