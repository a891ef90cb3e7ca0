"""fastinfer: a high-performance LLM inference runtime library.

Public names only; see DESIGN.md for the layers behind them.
"""
from fastinfer.engine.async_engine import AsyncEngine
from fastinfer.engine.config import EngineConfig
from fastinfer.engine.engine import Engine
from fastinfer.engine.llm import LLM
from fastinfer.engine.outputs import CompletionOutput, RequestMetrics, RequestOutput
from fastinfer.errors import (ArgumentTypeError, ConfigError, EngineDeadError, EngineOverloadedError,
                              EngineShutdownError, FastInferError, InvalidArgumentError, InvalidRequestError,
                              ModelLoadError, RequestTooLargeError, RequestTypeError)
from fastinfer.sampling.grammar import GrammarCompileTimeout
from fastinfer.sampling.params import SamplingParams, StructuredOutputsParams

__version__ = "0.1.0"

__all__ = [
    "LLM", "ArgumentTypeError", "AsyncEngine", "CompletionOutput", "ConfigError", "Engine", "EngineConfig",
    "EngineDeadError", "EngineOverloadedError", "EngineShutdownError", "FastInferError", "GrammarCompileTimeout",
    "InvalidArgumentError", "InvalidRequestError", "ModelLoadError", "RequestMetrics", "RequestOutput",
    "RequestTooLargeError", "RequestTypeError", "SamplingParams", "StructuredOutputsParams", "__version__",
]
