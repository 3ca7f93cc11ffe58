"""Keyword-only service functions: the only code that reads and writes rows for the routes."""
