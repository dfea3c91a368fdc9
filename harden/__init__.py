"""harden: a deployment-hardening compiler pass for image classifiers.

The package imports nothing heavy at top level so that `harden inject` and
`harden certify` start with only onnx, onnxruntime and numpy loaded.
"""

from harden.errors import HardenError

__version__ = "0.1.0"
__all__ = ["HardenError", "__version__"]
