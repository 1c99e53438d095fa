"""canopy-monitor: canopy entropy and the length-rate correlation of a language model
while it fine-tunes."""

from .callback import CanopyMonitorCallback
from .config import SamplingConfig
from .estimators import BootstrapConfig, FigureChange, paired_change
from .exact import ExactCanopy, exact_canopy
from .measurement import Measurement, measure
from .models import load_model_and_tokenizer

__version__ = "0.1.0"

__all__ = [
    "BootstrapConfig",
    "CanopyMonitorCallback",
    "ExactCanopy",
    "FigureChange",
    "Measurement",
    "SamplingConfig",
    "exact_canopy",
    "load_model_and_tokenizer",
    "measure",
    "paired_change",
    "__version__",
]
