"""Shared fixtures: the tiny guidance models, built once per test session into a temporary folder."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from backend.guidance.models import GuidanceModels, load_models
from backend.guidance.tiny import build_tiny_models


@pytest.fixture(scope="session")
def tiny_folder(tmp_path_factory) -> Path:
    return build_tiny_models(tmp_path_factory.mktemp("tiny-models"), seed=0)


@pytest.fixture(scope="session")
def tiny_models(tiny_folder) -> GuidanceModels:
    return load_models(str(tiny_folder), device="cpu", dtype=torch.float32)
