"""Fixtures for the Dagster tests live in tests/conftest.py (shared with tests/reliability)."""
