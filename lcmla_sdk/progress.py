"""A progress display for long one-off stages (compiling, capturing): a spinner and the time spent on each."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager, nullcontext

from rich.progress import Progress, SpinnerColumn, TextColumn, TimeElapsedColumn


@contextmanager
def stages(enabled: bool = True) -> Iterator[Callable[[str], AbstractContextManager]]:
    """Yield ``stage(description)``: a context manager that shows the stage while it runs (or nothing when
    ``enabled`` is false), then keeps its line with the time it took."""
    if not enabled:
        yield lambda description: nullcontext()
        return
    with Progress(SpinnerColumn(), TextColumn("{task.description}"), TimeElapsedColumn()) as progress:

        @contextmanager
        def stage(description: str) -> Iterator[None]:
            task = progress.add_task(description, total=1)
            yield
            progress.update(task, completed=1)
            progress.stop_task(task)

        yield stage
