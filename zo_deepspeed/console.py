"""What the command line shows: rank 0's progress bar, accuracy lines and real warnings; not the
libraries' known-harmless chatter. Each filter below names one message of one library and why it is
harmless here; nothing is silenced wholesale. Installed by the CLI (a program's choice), never on
import of the library."""
from __future__ import annotations

import contextlib
import io
import logging
import sys
import warnings

__all__ = ["quiet_known_noise", "drop_stdout_lines", "hf_progress_bars_off"]

# DeepSpeed's logger: at import it warns "Setting accelerator to CPU. If you have GPU ... we were unable
# to detect it." On a CPU-only machine that is the expected fallback; distributed.setup prints one line
# of its own naming the device instead, on rank 0 only (DeepSpeed's goes out once per rank).
_DS_CPU_FALLBACK = "Setting accelerator to CPU"


class _DropMessage(logging.Filter):
    def __init__(self, prefix: str):
        super().__init__()
        self.prefix = prefix

    def filter(self, record: logging.LogRecord) -> bool:
        return not record.getMessage().startswith(self.prefix)


def quiet_known_noise() -> None:
    """Install the filters. Must run before ``deepspeed`` is imported (its warning fires at import)."""
    logging.getLogger("DeepSpeed").addFilter(_DropMessage(_DS_CPU_FALLBACK))
    # DeepSpeed 0.19's ZeRO-3 gathers call torch.distributed.all_gather_into_tensor, which torch 2.13
    # deprecates with a FutureWarning at every first call site: DeepSpeed's to change, not the user's.
    warnings.filterwarnings("ignore", message=r"`torch\.distributed\.all_gather_into_tensor` is deprecated",
                            category=FutureWarning)


@contextlib.contextmanager
def drop_stdout_lines(*prefixes: str):
    """Run a block whose library code ``print``s status lines: lines starting with one of ``prefixes``
    are dropped, every other line is passed on to stdout."""
    buf = io.StringIO()
    try:
        with contextlib.redirect_stdout(buf):
            yield
    finally:
        for line in buf.getvalue().splitlines(keepends=True):
            if not line.startswith(prefixes):
                sys.stdout.write(line)


@contextlib.contextmanager
def hf_progress_bars_off():
    """transformers draws a "Loading weights" bar per from_pretrained; the run's own bar is the one to see."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            hf_logging.enable_progress_bar()
