"""fastinfer: a high-performance LLM inference runtime library.

Public names only; see DESIGN.md for the layers behind them.
"""
from fastinfer.engine.config import EngineConfig
from fastinfer.engine.engine import Engine
from fastinfer.engine.llm import LLM
from fastinfer.engine.outputs import CompletionOutput, RequestMetrics, RequestOutput
from fastinfer.errors import (FastInferError, InvalidRequestError, ModelLoadError,
                              RequestTooLargeError)
from fastinfer.sampling.params import SamplingParams

__version__ = "0.1.0"

__all__ = [
    "LLM", "CompletionOutput", "Engine", "EngineConfig", "FastInferError", "InvalidRequestError",
    "ModelLoadError", "RequestMetrics", "RequestOutput", "RequestTooLargeError", "SamplingParams",
    "__version__",
]
