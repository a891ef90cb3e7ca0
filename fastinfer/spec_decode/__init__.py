"""Speculative decoding (issue 25): proposers of draft tokens, their configuration and the
``Speculator`` that the engine asks for drafts each step (with its backoff and counts).

``SpeculativeConfig`` takes vLLM's ``speculative_config`` names; ``NgramProposer`` drafts from a
request's own prompt and output (prompt lookup). The engine verifies the drafts in one forward
pass (``Sampler.verify``, ``fastinfer.sampling.rejection``).
"""
from fastinfer.spec_decode.config import SpeculativeConfig
from fastinfer.spec_decode.ngram import NgramProposer
from fastinfer.spec_decode.speculator import Speculator

__all__ = ["NgramProposer", "SpeculativeConfig", "Speculator"]
