"""ds_quant: FP8 inference for DeepSpeed AutoTP models, with HQT-compatible configs.

Importing this package does not import DeepSpeed, touch a device or read the environment.
"""

from .config import QuantConfig
from .errors import (
    CheckpointError,
    ConfigError,
    DsQuantError,
    HessianError,
    MeasurementError,
    RankError,
    SmoothError,
)
from .hook import add_quant_args, install, uninstall
from .parallel.dist import shutdown
from .prepare import prep_model
from .workflows.measure import finish_measurements

__all__ = ["CheckpointError", "ConfigError", "DsQuantError", "HessianError", "MeasurementError", "QuantConfig",
           "RankError", "SmoothError", "add_quant_args", "finish_measurements", "install", "prep_model", "shutdown",
           "uninstall"]
__version__ = "0.1.0"
