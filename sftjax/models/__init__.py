"""Architectures only: what a model computes, never how it is fine-tuned (see `layers.py` for the hook points)."""


def architecture(cfg):
    """The module class for a config: `Llama` for a `LlamaConfig`, `Bert` for a `BertConfig`."""
    from sftjax.models.bert import Bert, BertConfig
    from sftjax.models.llama import Llama, LlamaConfig

    for config, module in ((LlamaConfig, Llama), (BertConfig, Bert)):
        if isinstance(cfg, config):
            return module
    raise TypeError(f"architecture: no model for a {type(cfg).__name__}")
