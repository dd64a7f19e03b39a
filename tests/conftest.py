"""Shared test set-up."""

import logging

import pytest


@pytest.fixture(autouse=True)
def _restore_root_logging():
    """``glr`` entry points (``cli.main``, the kernel's ``main``) configure the root logger for the
    process; in-process tests would otherwise leave a handler bound to a captured stream that a
    later test finds closed ("--- Logging error ---" on its stderr)."""
    root = logging.getLogger()
    handlers, level = root.handlers[:], root.level
    yield
    root.handlers[:] = handlers
    root.setLevel(level)
