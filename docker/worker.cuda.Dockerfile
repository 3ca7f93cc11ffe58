# The GPU worker: CUDA PyTorch + disp + the service stack. One Celery process, threads pool with one
# thread (CUDA-safe: nothing forks; the consumer keeps answering broker heartbeats while a stage runs),
# prefetch 1, acks late; each stage shard runs under a lease (worker/lease.py).
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
# Pool, concurrency and queues come from DISP_POOL (threads), DISP_CONCURRENCY (1), DISP_QUEUES (gpu,cpu).
CMD ["celery", "-A", "worker.celery_app", "worker", "--loglevel", "INFO", "--without-gossip", "--without-mingle"]
