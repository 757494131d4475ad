"""ds_quant: quantized inference for DeepSpeed AutoTP models, with HQT-compatible configs.

The public API, by what you do with it (the rest of the package is laid out in wings: docs/development.md):

    prepare a model     prep_model(model, config)       MEASURE or QUANTIZE a model after init_inference
                        finish_measurements(model)      MEASURE: write this rank's shard and the merged file
                        install() / uninstall()         hook every deepspeed.init_inference call (and from_pretrained
                                                        of quantized folders); add_quant_args adds --quant-config
                        shutdown()                      end the job in order (barrier, shm buffers, process group)
    configure           QuantConfig                     a strict, HQT-compatible config (from a dict or a JSON file)
    errors              DsQuantError                    the base of every error ds_quant raises for bad input:
                        ConfigError, MeasurementError, CheckpointError, RankError, HessianError, SmoothError

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

__all__ = [
    # prepare a model
    "prep_model", "finish_measurements", "install", "uninstall", "add_quant_args", "shutdown",
    # configure
    "QuantConfig",
    # errors
    "DsQuantError", "ConfigError", "MeasurementError", "CheckpointError", "RankError", "HessianError", "SmoothError",
]
__version__ = "0.1.0"
