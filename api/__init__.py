"""disp service API: FastAPI app, database models, storage, and the client. Never imports torch."""
