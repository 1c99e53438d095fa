"""canopy-monitor: canopy entropy and the length-rate correlation of a language model
while it fine-tunes."""

from .callback import CanopyMonitorCallback
from .config import SamplingConfig
from .measurement import Measurement, measure
from .models import load_model_and_tokenizer

__version__ = "0.1.0"

__all__ = [
    "CanopyMonitorCallback",
    "Measurement",
    "SamplingConfig",
    "load_model_and_tokenizer",
    "measure",
    "__version__",
]
