"""Runnable examples: a gateway guarded by gateway_breaker and a flaky demo upstream."""
