# The API image: FastAPI + SQLAlchemy + Celery client + boto3. No torch: the API imports only
# disp.config and disp.constants (stdlib), so the disp package is installed without its dependencies.
FROM python:3.11-slim AS api

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
WORKDIR /app

RUN pip install \
      "fastapi>=0.115" "uvicorn[standard]>=0.30" "python-multipart>=0.0.9" "pydantic-settings>=2.4" \
      "sqlalchemy>=2.0" "alembic>=1.13" "psycopg[binary]>=3.2" "celery[redis]>=5.4" "redis>=5" \
      "boto3>=1.34" "prometheus-client>=0.20" "httpx>=0.27"

COPY pyproject.toml README.md alembic.ini ./
COPY disp ./disp
COPY api ./api
COPY worker ./worker
RUN pip install --no-deps . \
 && python -c "import sys, api.main; assert 'torch' not in sys.modules"

RUN useradd --create-home --uid 10001 disp
USER disp
EXPOSE 8000
HEALTHCHECK --interval=15s --timeout=3s --retries=5 \
  CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/healthz', timeout=2)"
# Migrations (packaged in api/migrations) run in the app's start-up, advisory-locked, so several replicas
# may start together. DISP_API_WORKERS processes; each sheds load past its limits (api/limits.py).
CMD ["python", "-m", "api.serve", "--host", "0.0.0.0", "--port", "8000"]
