"""``python -m lcmla_sdk.cli`` (what ``accelerate launch -m`` and ``torchrun -m`` run)."""

from . import app

app()
