"""Pruning methods by name, one module each, and what they share, one home each.

``registry`` holds what a method declares and receives (``register``, ``Option``, ``Context``,
``PruneResult``) and the lookup by name; ``guard`` holds ``prune``, which checks the call and keeps the
user's model untouched when a prune fails; ``structured`` holds what channel-removing methods share (their
options, the BN-|γ| sparsity regulariser, the cost they record). A new method is one module here that
imports these from the package and calls ``register``.
"""

from __future__ import annotations

from .guard import prune
from .registry import BN_RECALIBRATE, REGISTRY, Batches, Context, Method, Option, PruneResult, available, get, register
from .structured import BN_SPARSITY_OPTIONS, DEFAULT_S, STRUCTURED_OPTIONS, bn_sparsity, cost, prunable_bns

__all__ = ["BN_RECALIBRATE", "BN_SPARSITY_OPTIONS", "DEFAULT_S", "REGISTRY", "STRUCTURED_OPTIONS", "Batches",
           "Context", "Method", "Option", "PruneResult", "available", "bn_sparsity", "cost", "get",
           "prunable_bns", "prune", "register"]
