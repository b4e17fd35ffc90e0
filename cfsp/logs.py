"""Logging set-up shared by the CLI and the flows: rich on a terminal, plain lines otherwise.

Progress bars: cfsp's own tqdm bars are drawn only when stderr is a terminal (`disable=None`
at each bar), and on a terminal log lines are written through `tqdm.write`, so a line never
lands inside a bar. Third-party bars that repeat on every model load (transformers' `Loading
weights`, the hub's downloads, datasets' split generation) are switched off."""

from __future__ import annotations

import logging
import os
import sys
import warnings


class _StderrHandler(logging.StreamHandler):
    """Writes to whatever `sys.stderr` is when a record is emitted, not when it was created:
    in-process callers (tests, notebooks, CliRunner) swap and close stderr streams, and a
    handler holding a closed one breaks every later log call of the process."""

    @property
    def stream(self):
        return sys.stderr

    @stream.setter
    def stream(self, _value) -> None:
        pass


class _BarSafeStderr:
    """The file rich's log console writes to on a terminal: the current `sys.stderr`, reached
    through `tqdm.write`, which clears any progress bar, writes the line and redraws the bar.
    `tqdm.contrib.logging.logging_redirect_tqdm` does the same for plain stream handlers only,
    not for rich's."""

    def write(self, text: str) -> int:
        from tqdm import tqdm

        tqdm.write(text, file=sys.stderr, end="")
        return len(text)

    def flush(self) -> None:
        sys.stderr.flush()

    def isatty(self) -> bool:
        return sys.stderr.isatty()

    @property
    def encoding(self) -> str:
        return getattr(sys.stderr, "encoding", None) or "utf-8"


def quiet_library_progress() -> None:
    """Switch off the progress bars of the Hugging Face libraries for this process (and the
    processes it starts): transformers draws `Loading weights` on every model load."""
    os.environ.setdefault("HF_HUB_DISABLE_PROGRESS_BARS", "1")
    os.environ.setdefault("HF_DATASETS_DISABLE_PROGRESS_BARS", "1")
    from transformers.utils import logging as hf_logging

    hf_logging.disable_progress_bar()  # transformers' bars and huggingface_hub's


def setup_logging(verbose: bool = False) -> None:
    from rich.console import Console
    from rich.logging import RichHandler

    level = logging.DEBUG if verbose else logging.INFO
    if sys.stderr.isatty():
        console = Console(file=_BarSafeStderr(), stderr=True)
        handler: logging.Handler = RichHandler(console=console, show_path=False, markup=False)
        fmt = "%(message)s"
    else:  # logs and CI: one plain line per event, never wrapped
        handler = _StderrHandler()
        fmt = "%(asctime)s %(levelname)s %(message)s"
    logging.basicConfig(level=level, format=fmt, datefmt="%H:%M:%S", handlers=[handler], force=True)
    # Libraries we call are chatty at INFO; keep our own lines readable.
    for noisy in ("httpx", "urllib3", "datasets", "filelock", "fsspec"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    if not sys.stderr.isatty():
        # tqdm reads TQDM_* defaults when it is first imported (not yet, in the CLI): bars of
        # libraries that leave `disable` unset (lm-eval's request building) stay off in logs.
        os.environ.setdefault("TQDM_DISABLE", "1")
    quiet_library_progress()
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()
    warnings.filterwarnings("ignore", category=FutureWarning)
