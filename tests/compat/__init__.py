"""Real client libraries driven against a running server (see tests/component/test_client_compat.py)."""
