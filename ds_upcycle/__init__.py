"""ds_upcycle: upcycle dense Llama-family checkpoints into DeepSpeed Mixture-of-Experts models."""

__version__ = "0.1.0"
