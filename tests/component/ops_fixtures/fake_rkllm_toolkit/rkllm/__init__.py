"""Stand-in for RKLLM-Toolkit in tests: same import path, records calls instead of converting."""
