#!/usr/bin/env bash
# Start the local PostgreSQL, Redis and RabbitMQ if they are down (as the machine image starts them).
set -u
if ! pg_isready -h 127.0.0.1 -p 5432 -q 2>/dev/null; then
  echo "starting PostgreSQL"
  pg_ctlcluster --skip-systemctl-redirect "$(ls /etc/postgresql | head -n1)" main start || true
fi
if ! redis-cli -h 127.0.0.1 -p 6379 ping >/dev/null 2>&1; then
  echo "starting Redis"
  redis-server --daemonize yes --bind 127.0.0.1 -::1 --port 6379 --save "" --appendonly no \
    --dir /var/lib/redis --logfile /var/log/redis/ci.log || true
fi
if command -v rabbitmqctl >/dev/null 2>&1 && ! rabbitmqctl -q status >/dev/null 2>&1; then
  echo "starting RabbitMQ"
  rabbitmq-server -detached || true
fi
# RabbitMQ is the service's broker: the worker and fault tests use it (one vhost per test session).
for _ in $(seq 60); do
  pg_isready -h 127.0.0.1 -p 5432 -q 2>/dev/null && redis-cli -h 127.0.0.1 ping >/dev/null 2>&1 \
    && rabbitmqctl -q await_startup >/dev/null 2>&1 && exit 0
  sleep 1
done
echo "warning: PostgreSQL, Redis or RabbitMQ is still not answering" >&2
