"""Typed errors. Each names the problem and the fix, so a CLI or dashboard can show it as is."""
from __future__ import annotations


class HeadwiseError(Exception):
    """Base class: every error headwise raises on bad input derives from it."""


class UnknownModelError(HeadwiseError, KeyError):
    def __str__(self) -> str:  # KeyError would quote the message
        return str(self.args[0]) if self.args else ""


class ModelLoadError(HeadwiseError, RuntimeError):
    pass


class InputError(HeadwiseError, ValueError):
    """Empty text, wrong shapes, values outside their range."""


class ContextLengthError(InputError):
    pass


class HeadOutOfRangeError(InputError, IndexError):
    pass


class MemoryBudgetError(HeadwiseError, MemoryError):
    pass


class CorruptFileError(HeadwiseError, ValueError):
    """A results, record or calibration file that cannot be read back as what it claims to be."""


class ModelMismatchError(HeadwiseError, ValueError):
    """A file made for another model (different id or weights hash)."""


class UnsupportedModelError(HeadwiseError, RuntimeError):
    """A model (or one attention call of it) that headwise cannot compute exactly: it names the model,
    what it does that headwise does not support, and what to do instead."""


class SpecError(InputError, CorruptFileError):
    """An intervention spec that cannot be used as written; the message names the edit and the field."""
