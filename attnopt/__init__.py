"""attnopt: find attention in a model and rewrite it into fused kernels."""

from attnopt import errors
from attnopt.api import OptimizedModule, inspect, optimize
from attnopt.calibrate import calibrate
from attnopt.finetune import prefix_ntk
from attnopt.frontends.dynamo.backend import compile_report
from attnopt.report import Report
from attnopt.tensor_layer import TensorAttention, to_tensor_attention

__all__ = [
    "OptimizedModule",
    "Report",
    "TensorAttention",
    "calibrate",
    "compile_report",
    "errors",
    "inspect",
    "optimize",
    "prefix_ntk",
    "to_tensor_attention",
]
__version__ = "0.1.0"
