"""The one user-facing error type.

`HardenError` means "the input is wrong or the model cannot be hardened": the CLI
prints its message on one line and exits 1. Any other exception is a bug and keeps
its traceback, so that bugs are never disguised as user errors.
"""


class HardenError(Exception):
    """Bad user input, or a model that this tool refuses to handle, with the reason."""
