"""GGUF export for llama.cpp and Ollama: merged models and adapter-only files."""
