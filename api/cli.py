"""Service commands for the `disp` CLI: `serve`, `jobs submit|watch|download|list|cancel`,
`keys create|revoke|list` and `models register|list`. `disp.cli` calls `add_commands(subparsers)`;
`python -m api.cli ...` works on its own too."""

from __future__ import annotations

import argparse
import json
import os
import sys
from pathlib import Path
from typing import Any


def _db_settings(args: argparse.Namespace):
    """Admin commands talk to the database directly: the embedded data dir, or DISP_* settings."""
    if getattr(args, "data_dir", None):
        from api.embedded import apply_env, embedded_env

        apply_env(embedded_env(args.data_dir))
    from api.config import get_settings
    from api.migrate import upgrade

    settings = get_settings()
    upgrade(settings.database_url)
    return settings


def cmd_serve(args: argparse.Namespace) -> int:
    from api.embedded import serve

    serve(args.data_dir, host=args.host, port=args.port, worker=not args.no_worker)
    return 0


def cmd_keys(args: argparse.Namespace) -> int:
    from api.db.session import session_scope
    from api.services import tenants

    settings = _db_settings(args)
    with session_scope(settings.database_url) as session:
        if args.keys_command == "create":
            tenant = tenants.get_or_create_tenant(session=session, name=args.tenant)
            key, plaintext = tenants.create_api_key(session=session, tenant_id=tenant.id)
            print(
                json.dumps({"key_id": key.id, "tenant_id": tenant.id, "api_key": plaintext})
                if args.json
                else f"{plaintext}\n(key {key.id}, tenant {tenant.name}; shown once, only its hash is kept)"
            )
        elif args.keys_command == "revoke":
            key = tenants.revoke_api_key(session=session, key_id=args.key_id)
            if key is None:
                print(f"no key {args.key_id}", file=sys.stderr)
                return 1
            print(f"revoked {key.id}")
        else:
            for key, tenant in tenants.list_api_keys(session=session, tenant_name=args.tenant):
                state = f"revoked {key.revoked_at:%Y-%m-%d}" if key.revoked_at else "active"
                print(f"{key.id}  {key.prefix}...  {tenant.name:<20} {state}")
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    from sqlalchemy import select

    from api.db.models import BaseModelEntry
    from api.db.session import session_scope
    from api.services.files import register_base_model
    from api.storage import get_storage

    settings = _db_settings(args)
    with session_scope(settings.database_url) as session:
        if args.models_command == "register":
            entry = register_base_model(
                session=session,
                storage=get_storage(settings),
                name=args.name,
                checkpoint_dir=Path(args.dir),
                settings=settings,
            )
            print(f"registered {entry.name} as {entry.id} ({entry.bytes} bytes)")
        else:
            for entry in session.scalars(select(BaseModelEntry).order_by(BaseModelEntry.name)):
                print(f"{entry.id}  {entry.name:<24} {entry.bytes} bytes")
    return 0


def _client(args: argparse.Namespace):
    from api.client import DispClient

    return DispClient(args.api_url, args.api_key)


def _settings_from(args: argparse.Namespace) -> dict[str, Any]:
    """--settings FILE.json, then --set a.b=value overrides (values parsed as JSON when they parse)."""
    settings: dict[str, Any] = json.loads(Path(args.settings).read_text()) if args.settings else {}
    for item in args.set or []:
        dotted, _, raw = item.partition("=")
        try:
            value = json.loads(raw)
        except json.JSONDecodeError:
            value = raw
        node = settings
        *parents, leaf = dotted.split(".")
        for part in parents:
            node = node.setdefault(part, {})
        node[leaf] = value
    return settings


def _watch(client, job_id: str, out: Path | None) -> int:
    from api.client import progress_line

    tty = sys.stdout.isatty()

    def show(job: dict) -> None:
        line = f"{job['id']} {progress_line(job)}"
        print(("\r" + line.ljust(100)) if tty else line, end="" if tty else "\n", flush=True)

    job = client.watch(job_id, on_update=show)
    print()
    if job["status"] != "succeeded":
        print(f"job {job_id} {job['status']}: {job.get('error')}", file=sys.stderr)
        return 1
    print(json.dumps(job["metrics"], indent=2))
    if out is not None:
        for kind, path in client.download_job(job_id, out).items():
            print(f"{kind}: {path}")
    return 0


def cmd_jobs(args: argparse.Namespace) -> int:
    with _client(args) as client:
        if args.jobs_command == "submit":
            dataset = (
                args.dataset if args.dataset.startswith("ds_") else client.upload_dataset(args.dataset)["id"]
            )
            if args.checkpoint.startswith("ckpt_"):
                checkpoint = args.checkpoint
            else:
                kind = "projector" if args.base_model else "full"
                checkpoint = client.upload_checkpoint(args.checkpoint, kind=kind, base_model=args.base_model)[
                    "id"
                ]
            client.wait_ready("dataset", dataset)
            client.wait_ready("checkpoint", checkpoint)
            job = client.create_job(
                dataset_id=dataset,
                checkpoint_id=checkpoint,
                settings=_settings_from(args),
                webhook_url=args.webhook_url,
                shard_size=args.shard_size,
            )
            print(job["id"])
            return _watch(client, job["id"], args.out) if args.watch else 0
        if args.jobs_command == "watch":
            return _watch(client, args.job_id, args.out)
        if args.jobs_command == "download":
            for kind, path in client.download_job(args.job_id, args.out).items():
                print(f"{kind}: {path}")
            return 0
        if args.jobs_command == "cancel":
            print(client.cancel_job(args.job_id)["status"])
            return 0
        for job in client.list_jobs(status=args.status):
            print(f"{job['id']}  {job['status']:<17} {job['created_at']}")
        return 0


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Register `serve`, `jobs`, `keys` and `models` on the `disp` command line."""
    p = sub.add_parser("serve", help="run the API and one worker here (SQLite, local files, no servers)")
    p.add_argument("--data-dir", type=Path, default=Path("./disp-data"))
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=8000)
    p.add_argument("--no-worker", action="store_true", help="API only")
    p.set_defaults(handler=cmd_serve)

    p = sub.add_parser("jobs", help="submit, watch and download defense jobs through the service")
    p.add_argument("--api-url", default=os.environ.get("DISP_API_URL", "http://127.0.0.1:8000"))
    p.add_argument("--api-key", default=os.environ.get("DISP_API_KEY"))
    jobs = p.add_subparsers(dest="jobs_command", required=True)
    s = jobs.add_parser("submit", help="upload inputs (paths) or reuse them (ids) and start a job")
    s.add_argument("--dataset", required=True, help="zip/tar of a LLaVA JSON and images, or a ds_ id")
    s.add_argument(
        "--checkpoint", required=True, help="checkpoint dir/archive, a projector .safetensors, or a ckpt_ id"
    )
    s.add_argument("--base-model", help="registered base model: --checkpoint is then a projector laid over it")
    s.add_argument("--settings", help="JSON file of DiSP settings (same fields as the CLI flags)")
    s.add_argument("--set", action="append", metavar="KEY=VALUE", help="e.g. finetune.epochs=2 (repeatable)")
    s.add_argument("--webhook-url")
    s.add_argument("--shard-size", type=int)
    s.add_argument("--watch", action="store_true", help="show progress until the job ends")
    s.add_argument("--out", type=Path, help="with --watch: download the artifacts here")
    w = jobs.add_parser("watch", help="show a job's progress until it ends")
    w.add_argument("job_id")
    w.add_argument("--out", type=Path, help="download the artifacts here when it succeeds")
    d = jobs.add_parser("download", help="download a job's artifacts")
    d.add_argument("job_id")
    d.add_argument("--out", type=Path, required=True)
    c = jobs.add_parser("cancel", help="cancel a job (cooperative)")
    c.add_argument("job_id")
    ls = jobs.add_parser("list", help="list jobs")
    ls.add_argument("--status")
    p.set_defaults(handler=cmd_jobs)

    admin = argparse.ArgumentParser(add_help=False)
    admin.add_argument("--data-dir", type=Path, help="the embedded service's data dir (else DISP_* settings)")
    p = sub.add_parser("keys", help="admin: create, revoke and list API keys (direct database access)")
    keys = p.add_subparsers(dest="keys_command", required=True)
    k = keys.add_parser("create", parents=[admin], help="new key for a tenant (created if new); shown once")
    k.add_argument("--tenant", required=True)
    k.add_argument("--json", action="store_true")
    k = keys.add_parser("revoke", parents=[admin])
    k.add_argument("key_id")
    k = keys.add_parser("list", parents=[admin])
    k.add_argument("--tenant")
    p.set_defaults(handler=cmd_keys)

    p = sub.add_parser("models", help="admin: register base models that projector checkpoints are laid over")
    models = p.add_subparsers(dest="models_command", required=True)
    m = models.add_parser("register", parents=[admin])
    m.add_argument("--name", required=True)
    m.add_argument("--dir", required=True, type=Path, help="checkpoint directory (safetensors only)")
    models.add_parser("list", parents=[admin])
    p.set_defaults(handler=cmd_models)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="disp", description="disp service commands")
    add_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    from api.client import DispError

    try:
        return args.handler(args)
    except (DispError, ValueError, FileNotFoundError) as exc:
        print(f"disp {args.command}: error: {exc}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
