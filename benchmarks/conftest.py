"""Fixtures of the micro-benchmarks (run with ``pytest benchmarks/``)."""
from __future__ import annotations

import pytest
import torch

from fastinfer.model.loader import load_model
from fastinfer.model.registry import resolve_model_path


@pytest.fixture(scope="session")
def smollm():
    return load_model(resolve_model_path("smollm2-135m"), torch.float32, torch.device("cpu"), "none")
