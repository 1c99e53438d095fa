"""`canopy-monitor report`: an offline HTML page of a monitored training run.

`load` reads the run from disk, `figures` draws matplotlib figures, `summary`
writes the text, and `page` assembles the self-contained HTML file.
"""

from .load import Run, load_run
from .page import write_report

__all__ = ["Run", "load_run", "write_report"]
