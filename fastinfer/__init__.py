"""fastinfer: a high-performance LLM inference runtime library.

Public names only; see DESIGN.md for the layers behind them.
"""
from fastinfer.sampling.params import SamplingParams

__version__ = "0.1.0"

__all__ = ["SamplingParams", "__version__"]
