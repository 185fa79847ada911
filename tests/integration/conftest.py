"""Fixtures of the integration tests beyond the session ones in tests/conftest.py."""
from __future__ import annotations

import pytest

from tests.helpers.slurm import cluster_problem


@pytest.fixture(scope="module")
def cluster():
    """The 2-node test cluster (.ci/slurm/setup.sh); the module is skipped, with the reason, when it is not up."""
    problem = cluster_problem()
    if problem:
        pytest.skip(problem)
