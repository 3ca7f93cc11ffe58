"""Service commands for the `disp` CLI: `serve`, `jobs submit|watch|download|list|cancel`,
`keys create|revoke|list` and `models register|list`. `disp.cli` calls `add_commands(subparsers)`;
`python -m api.cli ...` works on its own too."""

from __future__ import annotations

import argparse
import functools
import json
import os
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

from api.statuses import JOB_STATUSES


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
    from api.client import show_progress

    job = client.watch(job_id, on_update=show_progress())
    if job["status"] != "succeeded":
        error = job.get("error") or {}
        detail = f"{error.get('code')}: {error.get('message')}" if error else "no error recorded"
        print(f"disp jobs: job {job_id} {job['status']}: {detail}", file=sys.stderr)
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


def service_errors(handler: Callable[[argparse.Namespace], int]) -> Callable[[argparse.Namespace], int]:
    """The service's answers and network failures as one line on stderr (exit 1), not a traceback."""

    @functools.wraps(handler)
    def run(args: argparse.Namespace) -> int:
        import httpx

        from api.client import DispError

        try:
            return handler(args)
        except DispError as exc:
            hint = {401: "; check --api-key or DISP_API_KEY", 403: "; this key may not do that"}.get(
                exc.status, ""
            )
            request = f" (request {exc.request_id})" if exc.request_id else ""
            print(f"disp {args.command}: error: {exc}{hint}{request}", file=sys.stderr)
        except httpx.UnsupportedProtocol:
            print(
                f"disp {args.command}: error: --api-url must start with http:// or https://, got "
                f"{getattr(args, 'api_url', None)!r}",
                file=sys.stderr,
            )
        except httpx.TransportError as exc:
            url = getattr(args, "api_url", None) or "the service"
            reason = str(exc).split("] ")[-1] or type(exc).__name__
            print(
                f"disp {args.command}: error: cannot reach {url}: {reason} (is the service running? "
                "--api-url or DISP_API_URL names it)",
                file=sys.stderr,
            )
        except TimeoutError as exc:
            print(f"disp {args.command}: error: {exc}", file=sys.stderr)
        return 1

    return run


def add_commands(sub: argparse._SubParsersAction) -> None:
    """Register `serve`, `jobs`, `keys` and `models` on the `disp` command line."""
    p = sub.add_parser("serve", help="run the API and one worker here (SQLite, local files, no servers)")
    p.add_argument(
        "--data-dir",
        type=Path,
        default=Path("./disp-data"),
        help="database, uploads, artifacts and queue live here (default: ./disp-data)",
    )
    p.add_argument("--host", default="127.0.0.1", help="address to listen on (default: 127.0.0.1)")
    p.add_argument("--port", type=int, default=8000, help="port to listen on (default: 8000)")
    p.add_argument("--no-worker", action="store_true", help="API only")
    p.set_defaults(handler=cmd_serve)

    conn = argparse.ArgumentParser(add_help=False)  # given after the subcommand: `disp jobs list --api-key K`
    conn.add_argument(
        "--api-url",
        metavar="URL",
        default=os.environ.get("DISP_API_URL", "http://127.0.0.1:8000"),
        help="the service (default: $DISP_API_URL, else http://127.0.0.1:8000)",
    )
    conn.add_argument(
        "--api-key",
        metavar="KEY",
        default=os.environ.get("DISP_API_KEY"),
        help="API key (default: $DISP_API_KEY); `disp keys create` makes one",
    )
    p = sub.add_parser("jobs", help="submit, watch and download defense jobs through the service")
    jobs = p.add_subparsers(dest="jobs_command", required=True)
    s = jobs.add_parser(
        "submit", parents=[conn], help="upload inputs (paths) or reuse them (ids) and start a job"
    )
    s.add_argument("--dataset", required=True, help="zip/tar of a LLaVA JSON and images, or a ds_ id")
    s.add_argument(
        "--checkpoint", required=True, help="checkpoint dir/archive, a projector .safetensors, or a ckpt_ id"
    )
    s.add_argument("--base-model", help="registered base model: --checkpoint is then a projector laid over it")
    s.add_argument("--settings", help="JSON file of DiSP settings (same fields as the CLI flags)")
    s.add_argument("--set", action="append", metavar="KEY=VALUE", help="e.g. finetune.epochs=2 (repeatable)")
    s.add_argument("--webhook-url", metavar="URL", help="POST signed status events here (docs/webhooks.md)")
    s.add_argument(
        "--shard-size",
        type=int,
        metavar="N",
        help="samples per shard: stages run in shards on several workers (default: the service's)",
    )
    s.add_argument("--watch", action="store_true", help="show progress until the job ends")
    s.add_argument("--out", type=Path, help="with --watch: download the artifacts here")
    w = jobs.add_parser("watch", parents=[conn], help="show a job's progress until it ends")
    w.add_argument("job_id", help="a job_ id")
    w.add_argument("--out", type=Path, help="download the artifacts here when it succeeds")
    d = jobs.add_parser("download", parents=[conn], help="download a job's artifacts")
    d.add_argument("job_id", help="a job_ id")
    d.add_argument("--out", type=Path, required=True, help="directory to write the artifacts into")
    c = jobs.add_parser("cancel", parents=[conn], help="cancel a job (cooperative)")
    c.add_argument("job_id", help="a job_ id")
    ls = jobs.add_parser("list", parents=[conn], help="list jobs")
    ls.add_argument("--status", choices=JOB_STATUSES, help="only jobs in this status")
    p.set_defaults(handler=service_errors(cmd_jobs))

    admin = argparse.ArgumentParser(add_help=False)
    admin.add_argument("--data-dir", type=Path, help="the embedded service's data dir (else DISP_* settings)")
    p = sub.add_parser("keys", help="admin: create, revoke and list API keys (direct database access)")
    keys = p.add_subparsers(dest="keys_command", required=True)
    k = keys.add_parser("create", parents=[admin], help="new key for a tenant (created if new); shown once")
    k.add_argument("--tenant", required=True, help="tenant name")
    k.add_argument("--json", action="store_true", help="print JSON")
    k = keys.add_parser("revoke", parents=[admin], help="revoke a key: it stops working at once")
    k.add_argument("key_id", help="a key_ id (`disp keys list`)")
    k = keys.add_parser("list", parents=[admin], help="list keys and their state")
    k.add_argument("--tenant", help="only this tenant's keys")
    p.set_defaults(handler=cmd_keys)

    p = sub.add_parser("models", help="admin: register base models that projector checkpoints are laid over")
    models = p.add_subparsers(dest="models_command", required=True)
    m = models.add_parser("register", parents=[admin], help="register a checkpoint directory as a base model")
    m.add_argument("--name", required=True, help="the name projector checkpoints give as --base-model")
    m.add_argument("--dir", required=True, type=Path, help="checkpoint directory (safetensors only)")
    models.add_parser("list", parents=[admin], help="list registered base models")
    p.set_defaults(handler=cmd_models)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="disp", description="disp service commands")
    add_commands(parser.add_subparsers(dest="command", required=True))
    args = parser.parse_args(argv)
    try:
        return args.handler(args)
    except (ValueError, OSError) as exc:
        print(f"disp {args.command}: error: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"\ndisp {args.command}: interrupted", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
