"""The progress bar of a batch job: requests done of the file's total, elapsed, ETA, tokens/s."""
from __future__ import annotations

from rich.progress import MofNCompleteColumn, TextColumn, TimeElapsedColumn, TimeRemainingColumn

from infeng.telemetry import progress


class ProgressBar:
    """The progress bar (requests done of the file's total, elapsed, ETA, tokens/s) or nothing."""

    def __init__(self, show: bool, label: str, total: int):
        self.show, self.label, self.total = show, label, total

    def __enter__(self):
        if not self.show:
            return lambda st: None
        self.bar = progress(self.label, MofNCompleteColumn(), TimeElapsedColumn(), TextColumn("ETA"),
                            TimeRemainingColumn(), TextColumn("{task.fields[tok_s]:.0f} tok/s"))
        self.bar.__enter__()
        task = self.bar.add_task("batch", total=self.total, tok_s=0.0)
        return lambda st: self.bar.update(task, advance=1, tok_s=st.tok_s())

    def __exit__(self, *exc):
        if self.show:
            self.bar.__exit__(*exc)
        return False
