"""`rkllm-bench`: a fixed prompt set run against every board and model, and through the balancer."""
