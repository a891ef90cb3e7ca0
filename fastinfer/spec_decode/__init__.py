"""Speculative decoding (issue 25): proposers of draft tokens and their configuration.

``SpeculativeConfig`` takes vLLM's ``speculative_config`` names; ``NgramProposer`` drafts from a
request's own prompt and output (prompt lookup). Verification in the engine comes next.
"""
from fastinfer.spec_decode.config import SpeculativeConfig
from fastinfer.spec_decode.ngram import NgramProposer

__all__ = ["NgramProposer", "SpeculativeConfig"]
