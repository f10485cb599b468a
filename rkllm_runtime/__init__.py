"""librkllmrt 1.2.3 binding, the node server (rkllm-server), its client and the fleet benchmark."""
