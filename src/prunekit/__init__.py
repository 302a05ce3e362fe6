"""prunekit: prune trained PyTorch networks physically, and prove the saving with measurements."""

from . import data, models, sparse  # sparse registers its file format with io.load
from .errors import PrunekitError
from .io import load, save
from .measure import measure
from .methods import PruneResult, prune

__all__ = ["PrunekitError", "PruneResult", "data", "load", "measure", "models", "prune", "save", "sparse"]
__version__ = "0.1.0"
