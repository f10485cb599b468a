"""Real client libraries driven against a running server (see tests/unit/test_client_compat.py)."""
