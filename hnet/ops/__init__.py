"""Hot ops behind one function each: a pure-PyTorch reference and CUDA backends chosen automatically."""

from hnet.ops.attention import packed_attention
from hnet.ops.backend import BackendError, configure, resolve, selection
from hnet.ops.conv import causal_conv1d
from hnet.ops.norm import gated_rms_norm, rms_norm
from hnet.ops.ssd import ema_scan, ssd_scan

__all__ = [
    "BackendError", "causal_conv1d", "configure", "ema_scan", "gated_rms_norm", "packed_attention", "resolve",
    "rms_norm", "selection", "ssd_scan",
]
