"""Shipped OPIR checkpoints: `*.safetensors` weights, each with a `*.json` model card."""
