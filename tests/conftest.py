"""Shared pytest setup for opir's tests."""

import os

# Triton reads this when it is first imported: set it before any test module imports opir, so
# kernel tests on CPU run the Triton kernels through its interpreter.
os.environ.setdefault("TRITON_INTERPRET", "1")
