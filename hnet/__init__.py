"""H-Net: hierarchical byte-level language model with dynamic chunking, usable without the trainer."""

from hnet.config import FLAVORS, HNetConfig, HNetConfigError, lr_multipliers
from hnet.model import HNet, HNetForCausalLM, HNetOutput
from hnet.tokenizer import ByteTokenizer

__all__ = [
    "FLAVORS", "ByteTokenizer", "HNet", "HNetConfig", "HNetConfigError", "HNetForCausalLM", "HNetOutput",
    "lr_multipliers",
]
