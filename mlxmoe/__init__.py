"""mlxmoe: fine-tune Mixture-of-Experts LLMs in MLX and ship them to llama.cpp and Ollama."""

from .errors import CheckpointError, MlxMoeError
from .load import load, load_model, load_tokenizer

__version__ = "0.1.0"

__all__ = ["CheckpointError", "MlxMoeError", "__version__", "load", "load_model", "load_tokenizer"]
