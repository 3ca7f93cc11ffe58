# The GPU worker: CUDA PyTorch + disp + the service stack. One Celery process, solo pool (CUDA-safe:
# nothing forks after the model touches the GPU), prefetch 1, acks late.
FROM pytorch/pytorch:2.6.0-cuda12.4-cudnn9-runtime AS worker

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 \
    DISP_WORK_DIR=/var/lib/disp/work DISP_DEVICE=cuda
WORKDIR /app

COPY pyproject.toml README.md alembic.ini ./
COPY disp ./disp
COPY api ./api
COPY worker ./worker
RUN pip install ".[service]"

RUN useradd --create-home --uid 10001 disp && mkdir -p /var/lib/disp/work && chown -R disp /var/lib/disp
USER disp
# Never set TORCH_FORCE_NO_WEIGHTS_ONLY_LOAD: checkpoints are safetensors-only and pickles are refused.
CMD ["celery", "-A", "worker.celery_app", "worker", "--pool", "solo", "--concurrency", "1", \
     "--queues", "gpu,cpu", "--loglevel", "INFO", "--without-gossip", "--without-mingle"]
