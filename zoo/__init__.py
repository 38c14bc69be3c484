"""zoo: long-context sequence architectures as Hugging Face models, with one training and evaluation toolkit.

``import zoo`` registers every architecture with transformers' Auto classes.
"""

from zoo import models  # noqa: F401
from zoo.models import REGISTRY

__version__ = "0.1.0"
__all__ = ["REGISTRY", "__version__"]
