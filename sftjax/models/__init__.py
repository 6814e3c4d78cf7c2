"""Architectures only: what a model computes, never how it is fine-tuned (see `layers.py` for the hook points)."""
