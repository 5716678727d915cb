"""A progress bar that degrades: rich, else tqdm, else one line per point on stderr."""

from __future__ import annotations

import sys

__all__ = ["progress_bar"]


class _Plain:
    def __init__(self, total: int, enabled: bool):
        self.total, self.done, self.enabled = total, 0, enabled

    def update(self, text: str) -> None:
        self.done += 1
        if self.enabled:
            print(f"[{self.done}/{self.total}] {text}", file=sys.stderr, flush=True)

    def close(self) -> None:
        pass


class _Tqdm(_Plain):
    def __init__(self, total: int):
        from tqdm import tqdm

        self.bar = tqdm(total=total, unit="pt", dynamic_ncols=True)

    def update(self, text: str) -> None:
        self.bar.set_postfix_str(text, refresh=False)
        self.bar.update(1)

    def close(self) -> None:
        self.bar.close()


class _Rich(_Plain):
    def __init__(self, total: int):
        from rich.progress import (
            BarColumn,
            MofNCompleteColumn,
            Progress,
            TextColumn,
            TimeElapsedColumn,
            TimeRemainingColumn,
        )

        self.progress = Progress(TextColumn("[bold]bench"), BarColumn(), MofNCompleteColumn(),
                                 TimeElapsedColumn(), TimeRemainingColumn(),
                                 TextColumn("{task.description}"), transient=False)
        self.task = self.progress.add_task("", total=total)
        self.progress.start()

    def update(self, text: str) -> None:
        self.progress.update(self.task, advance=1, description=text)

    def close(self) -> None:
        self.progress.stop()


def progress_bar(total: int, enabled: bool = True):
    """An object with ``update(text)`` (one point done) and ``close()``."""
    if not enabled:
        return _Plain(total, False)
    for cls in (_Rich, _Tqdm):
        try:
            return cls(total)
        except ImportError:
            continue
    return _Plain(total, True)
