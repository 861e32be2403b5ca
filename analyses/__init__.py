"""Analyses: one package per paper, each an entry of the registry (:mod:`analyses.registry`) that the
one runner (:func:`run`) drives, returning a typed result (:mod:`analyses.contract`).

>>> from analyses import registry
>>> registry.get("retrieval").title
'Retrieval heads'
"""
from .runner import run  # noqa: F401
