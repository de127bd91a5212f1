import warnings

import pytest


def pytest_configure(config):
    config.addinivalue_line("markers", "slow: multi-process tests with 8 ranks (run by default)")
    warnings.filterwarnings("ignore", message=".*Apex is not installed.*")
