"""Tracing (OpenTelemetry, :mod:`.tracing`) and Prometheus metrics (Ray, :mod:`.metrics`)."""
