"""HTTP routes of the node server: OpenAI-compatible (/v1) and Ollama-compatible (/api)."""
