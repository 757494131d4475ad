"""ds_quant: FP8 inference for DeepSpeed AutoTP models, with HQT-compatible configs.

Importing this package does not import DeepSpeed, touch a device or read the environment.
"""

from .config import ConfigError, QuantConfig
from .dist import RankError, shutdown
from .hook import add_quant_args, install, uninstall
from .measurements import MeasurementError
from .prepare import finish_measurements, prep_model

__all__ = ["ConfigError", "MeasurementError", "QuantConfig", "RankError", "add_quant_args", "finish_measurements",
           "install", "prep_model", "shutdown", "uninstall"]
__version__ = "0.1.0"
