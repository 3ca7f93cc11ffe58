"""Routers, one per resource, all mounted under /v1 except health and metrics."""
