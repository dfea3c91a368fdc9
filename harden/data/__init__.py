"""Datasets by spec string, and the preprocessing a model declares.

Every subcommand that reads images goes through `load_dataset(spec)`, so the
spec syntax, validation and error messages are the same everywhere.
"""

from harden.data.dataset import Dataset
from harden.data.preprocess import Preprocess
from harden.data.specs import SPEC_HELP, load_dataset

__all__ = ["Dataset", "Preprocess", "SPEC_HELP", "load_dataset"]
