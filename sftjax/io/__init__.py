"""Weights in and out: HF safetensors folders, GGUF files, the embedded default model."""
