"""refusal-directions: find, remove and steer refusal directions in instruction-tuned LLMs.

Notebook entry points::

    from refusal_directions import load_model, load_dataset
    adapter = load_model("embedded")            # or a hub id, a folder, a .gguf file
    harmful = load_dataset("harmful_train", data_dir="../shared/datasets")
"""

from .data import load_dataset, sample
from .models import ModelAdapter, load_model

__version__ = "0.1.0"
__all__ = ["ModelAdapter", "load_dataset", "load_model", "sample", "__version__"]
