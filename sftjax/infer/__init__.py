"""Inference: KV-cached generation."""
