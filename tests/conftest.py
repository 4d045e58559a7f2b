import os
import sys

import pytest
import torch

sys.path.insert(0, os.path.dirname(__file__))

from hypothesis import HealthCheck, settings  # noqa: E402

# function-scoped fixtures below (both_paths) only set a flag that holds for every example
_quiet = [HealthCheck.function_scoped_fixture]
settings.register_profile("ci", max_examples=60, deadline=None, derandomize=True, suppress_health_check=_quiet)
settings.register_profile("dev", max_examples=100, deadline=None, suppress_health_check=_quiet)
settings.load_profile("ci" if os.environ.get("CI") else os.environ.get("HYPOTHESIS_PROFILE", "dev"))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
    yield


@pytest.fixture(params=[True, False], ids=["fast-paths", "kernels"])
def both_paths(request, monkeypatch):
    """Run a test through quantize's few-op fast paths and through the kernels they must equal bit for bit."""
    import importlib

    monkeypatch.setattr(importlib.import_module("lowprec.formats.quantize"), "FAST_PATHS", request.param)
    return request.param


@pytest.fixture
def eager_update(monkeypatch):
    """Native models' Trainer takes the eager update (its compiled one is tested in test_fused.py): spares a
    test the compile of the fused step."""
    monkeypatch.setenv("LOWPREC_COMPILE", "0")
