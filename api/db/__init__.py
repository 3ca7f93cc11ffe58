"""SQLAlchemy models and sessions, shared by the API and the worker."""
