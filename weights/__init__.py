"""Shipped OPIR checkpoints: `*.safetensors` weights, each with a `*.json` model card.

DEFAULT names the one `opir restore` and `opir profile` use when none is given; it lives here,
with no import, so the command line can show it in `--help` without loading torch.
"""

DEFAULT = "opir-small-allinone"
