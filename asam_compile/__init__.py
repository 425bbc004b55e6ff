"""asam_compile: a torch.compile backend that rewrites hand-written attention into fast kernels.

Use it with no import: `torch.compile(model, backend="asam")` (registered through the
`torch_dynamo_backends` entry point). Import it for `explain`, `capture`, `sparse` (opt modules into adaptive sparse attention) and the config.
"""

from asam_compile import _logging  # noqa: F401  (registers the asam_compile logger with TORCH_LOGS)
from asam_compile.backend import asam_backend, capture, explain
from asam_compile.config import AsamConfig, SparseSettings
from asam_compile.report import Candidate, GraphReport, Reject, Report
from asam_compile.sparse import sparse

__version__ = "0.1.0"

__all__ = [
    "AsamConfig",
    "Candidate",
    "GraphReport",
    "Reject",
    "SparseSettings",
    "Report",
    "asam_backend",
    "capture",
    "explain",
    "sparse",
    "__version__",
]
