"""Side-by-side load tests of the gateway: ``python -m loadtest`` (see docs/performance.md)."""
