"""Offramp: serve decoder LMs split into pipeline stages with early exits."""

__version__ = "0.1.0"
