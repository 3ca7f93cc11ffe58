"""disp worker: Celery tasks; the only place where `disp` meets the database, storage and the network."""
