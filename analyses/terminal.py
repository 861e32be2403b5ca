"""Terminal progress for long commands: one bar per step on a terminal, one line per finished step in a log.

:func:`bar` is what the runner and the CLI report through. On a terminal it is a tqdm bar (redrawn in
place, so a finished bar is one line); when stderr is a file or a pipe (``nohup``, CI, ``| tee``) the
carriage-return redraws would pile up, so it writes one line when the step is finished (and one a
minute while a long step runs). :func:`layer_bar` reports one forward pass layer by layer
(``headwise stats`` / ``capture`` on a long text) through plain forward hooks on the decoder blocks:
nothing the model computes changes. :func:`quiet_libraries` silences the libraries' own warnings
(transformers' tokenizer-length notice, deprecation FutureWarnings) in the CLI, where a user cannot act
on them; headwise's own notices and errors are unaffected.
"""
from __future__ import annotations

import sys
import time
import warnings
from contextlib import contextmanager

LOG_EVERY_S = 60.0


def _fmt(seconds: float) -> str:
    s = int(round(seconds))
    return f"{s // 60}:{s % 60:02d}" if s < 3600 else f"{s // 3600}:{s // 60 % 60:02d}:{s % 60:02d}"


class LineBar:
    """The non-terminal bar: a line at the end (and every :data:`LOG_EVERY_S`), never carriage returns."""

    def __init__(self, total: int, desc: str, unit: str, initial: int = 0, file=None):
        self.total, self.desc, self.unit, self.n = total, desc, unit, initial
        self.file = file or sys.stderr
        self.start = self.last = time.monotonic()
        self.first = initial
        self.closed = False

    def update(self, k: int = 1) -> None:
        self.n += k
        now = time.monotonic()
        if now - self.last >= LOG_EVERY_S and self.n < self.total:
            self.last = now
            self._line(f"{self.n}/{self.total} {self.unit}s, {_fmt(now - self.start)} elapsed")

    def close(self) -> None:
        if self.closed:
            return
        self.closed = True
        resumed = f" ({self.first} resumed)" if self.first else ""
        self._line(f"{self.n}/{self.total} {self.unit}s{resumed} in {_fmt(time.monotonic() - self.start)}")

    def _line(self, text: str) -> None:
        print(f"{self.desc}: {text}", file=self.file, flush=True)


def bar(total: int, desc: str, unit: str = "unit", initial: int = 0, file=None):
    """A progress bar with ``update(k)`` and ``close()``: tqdm on a terminal, :class:`LineBar` otherwise."""
    file = file or sys.stderr
    if getattr(file, "isatty", lambda: False)():
        from tqdm.auto import tqdm

        return tqdm(total=total, initial=initial, desc=desc, unit=unit, file=file)
    return LineBar(total, desc, unit, initial, file)


@contextmanager
def layer_bar(model, desc: str, layers=None, file=None):
    """Report a forward pass of ``model`` layer by layer (``layers``: the ones computed, default all)."""
    from probe.families import blocks

    mods = list(blocks(model.hf))
    wanted = sorted(set(range(len(mods)) if layers is None else layers))
    progress = bar(len(wanted), desc, "layer", file=file)
    # a wanted layer counts when the next one starts (an engine may stop inside its last wanted layer)
    hooks = [mods[j].register_forward_pre_hook(lambda *_: progress.update(1)) for j in wanted[1:]]
    try:
        yield progress
        progress.update(len(wanted) - progress.n)           # the pass finished: every wanted layer is done
    finally:
        for h in hooks:
            h.remove()
        progress.close()


def quiet_libraries() -> None:
    """Silence library warnings a CLI user cannot act on (transformers logging, FutureWarnings of libraries)."""
    try:
        from transformers.utils import logging as hf_logging

        hf_logging.set_verbosity_error()
    except ImportError:  # pragma: no cover - transformers is a dependency
        pass
    for module in ("transformers", "torch", "accelerate", "huggingface_hub", "safetensors"):
        warnings.filterwarnings("ignore", category=FutureWarning, module=module)
        warnings.filterwarnings("ignore", category=DeprecationWarning, module=module)
