"""What a person reads on the terminal: log lines that never break a progress bar, and the short
summary every command prints at its end (what was written, and where).

    setup_logging(verbose)                       # the CLI's logging: tqdm-aware, one format
    print(summary("vtok export: step 500 -> out/model.safetensors + config.json",
                  [("weights", "out/model.safetensors"), ("config", "out/config.json")]))
"""
from __future__ import annotations

import logging
import sys
from pathlib import Path
from typing import Iterable

LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
LOG_DATEFMT = "%H:%M:%S"


class TqdmLoggingHandler(logging.StreamHandler):
    """A stream handler that writes through ``tqdm.write``: any active progress bar is cleared, the
    line written, and the bar redrawn below it, so a log line never lands glued onto a bar."""

    def emit(self, record: logging.LogRecord) -> None:
        from tqdm import tqdm

        try:
            tqdm.write(self.format(record), file=self.stream)
            self.flush()
        except RecursionError:
            raise
        except Exception:  # as logging.StreamHandler does: report, never raise from a log call
            self.handleError(record)


def setup_logging(verbose: bool = False) -> None:
    """Root logging for the ``vtok`` command: INFO (DEBUG with ``verbose``) to stderr, tqdm-aware."""
    level = logging.DEBUG if verbose else logging.INFO
    logging.basicConfig(level=level, format=LOG_FORMAT, datefmt=LOG_DATEFMT,
                        handlers=[TqdmLoggingHandler(sys.stderr)])
    logging.getLogger("streaming").setLevel(logging.DEBUG if verbose else logging.WARNING)


def summary(headline: str, rows: Iterable[tuple[str, object]]) -> str:
    """A command's closing block: ``headline``, then one aligned ``name  value`` line per row (rows
    whose value is None or empty are left out)."""
    kept = [(name, str(value)) for name, value in rows if value not in (None, "")]
    width = max((len(name) for name, _ in kept), default=0)
    return "\n".join([headline, *(f"  {name.ljust(width)}  {value}" for name, value in kept)])


def existing(path: str | Path) -> str | None:
    """``path`` as text when it exists (for optional summary rows), else None."""
    return str(path) if Path(path).exists() else None


__all__ = ["TqdmLoggingHandler", "existing", "setup_logging", "summary"]
