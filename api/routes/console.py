"""The web console: server-rendered HTML pages over the same data as the JSON API, no script.

    GET  /console                              sign-in form, or the tenant's jobs
    POST /console/login, /console/logout       the API key in an HttpOnly, SameSite=Strict cookie
    GET  /console/jobs/{id}                    status, progress, events, the report (docs/report.md) and per
                                               sample its heatmap, held tokens, original vs purified answer
    GET  /console/jobs/{id}/samples/{k}.png    the report's k-th sample's saliency heatmap (`disp.heatmap`)

Heatmaps are drawn over the sample's image, read from the job's dataset archive (downloaded once per API
process into `console_cache_dir`) when the archive is at most `console_max_archive_bytes`, else over grey.
Every text from a dataset or a report is HTML-escaped.
"""

from __future__ import annotations

import io
import json
import os
import tempfile
from functools import lru_cache
from html import escape
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Cookie, Form, Query, Response
from fastapi import Path as PathParam
from fastapi.responses import HTMLResponse, RedirectResponse
from sqlalchemy import select

from api.config import ApiSettings
from api.db.models import TERMINAL, Artifact, Dataset, Job, JobEvent, Tenant
from api.deps import SessionDep, SettingsDep, StorageDep, tenant_for_key
from api.schemas import ID_PATTERN
from api.services import jobs
from api.storage import Storage

router = APIRouter(prefix="/console", include_in_schema=False)
COOKIE = "disp_console"
SAMPLES_PER_PAGE = 12
CSP = "default-src 'none'; img-src 'self'; style-src 'unsafe-inline'; form-action 'self'; frame-ancestors 'none'"
STYLE = """
body{font:14px system-ui,sans-serif;margin:1.5em;color:#222;max-width:1200px}
table{border-collapse:collapse;margin:.5em 0}td,th{border:1px solid #ccc;padding:3px 8px;text-align:left;
vertical-align:top}th{background:#f3f3f3}a{color:#0645ad}.warn{background:#fff3cd;border:1px solid #e0b000;
padding:.5em 1em;margin:.5em 0}.err{background:#fde2e2;border:1px solid #c00;padding:.5em 1em}
.sample{display:flex;gap:1em;border:1px solid #ccc;padding:.7em;margin:.7em 0}.answers{display:flex;gap:1em;
flex:1}.answers div{flex:1;background:#fafafa;border:1px solid #ddd;padding:.5em;white-space:pre-wrap}
.changed{color:#b00;font-weight:bold}.kept{color:#070}progress{width:20em}
"""


def page(title: str, body: str, *, status: int = 200, refresh: bool = False) -> HTMLResponse:
    meta = '<meta http-equiv="refresh" content="5">' if refresh else ""
    html = (
        f'<!doctype html><html lang="en"><head><meta charset="utf-8"><title>{escape(title)} - disp</title>'
        f"{meta}<style>{STYLE}</style></head><body>{body}</body></html>"
    )
    return HTMLResponse(
        html, status_code=status, headers={"Content-Security-Policy": CSP, "Cache-Control": "no-store"}
    )


def sign_in(message: str = "", status: int = 200) -> HTMLResponse:
    error = f'<p class="err">{escape(message)}</p>' if message else ""
    return page(
        "Sign in",
        f"""<h1>disp console</h1>{error}
<form method="post" action="/console/login"><label>API key <input type="password" name="api_key" id="api_key"
size="50" autocomplete="off"></label> <button type="submit" id="sign_in">Sign in</button></form>""",
        status=status,
    )


def _tenant(session, key: str | None) -> Tenant | None:
    return tenant_for_key(session, key) if key else None


def _job(session, tenant: Tenant, job_id: str) -> Job | None:
    job = session.get(Job, job_id)
    return job if job is not None and job.tenant_id == tenant.id else None


@router.get("", response_class=HTMLResponse)
def jobs_page(session: SessionDep, disp_console: Annotated[str | None, Cookie()] = None) -> HTMLResponse:
    tenant = _tenant(session, disp_console)
    if tenant is None:
        return sign_in()
    rows, _ = jobs.list_jobs(session=session, tenant_id=tenant.id, limit=100, after=None, status=None)
    lines = []
    for job in rows:
        out = jobs.job_out(session=session, job=job)
        m = out.metrics or {}
        progress = f"{out.progress.done}/{out.progress.total}" if out.progress.total else ""
        lines.append(
            f'<tr><td><a href="/console/jobs/{escape(job.id)}">{escape(job.id)}</a></td>'
            f"<td>{escape(str(out.status))}</td><td>{escape(str(out.stage or ''))}</td><td>{progress}</td>"
            f"<td>{escape(str(job.settings.get('defense', '')))}</td>"
            f"<td>{_fmt(m.get('suspected'))}</td><td>{_fmt(m.get('residual_backdoor_rate'))}</td>"
            f"<td>{out.created_at:%Y-%m-%d %H:%M:%S}</td></tr>"
        )
    table = (
        "<table id='jobs'><tr><th>job</th><th>status</th><th>stage</th><th>progress</th><th>defense</th>"
        "<th>suspected</th><th>residual backdoor</th><th>created (UTC)</th></tr>"
        + "".join(lines)
        + "</table>"
        if lines
        else "<p>No jobs yet.</p>"
    )
    running = any(j.status not in TERMINAL for j in rows)
    return page("Jobs", f"<h1>Jobs</h1>{_logout()}{table}", refresh=running)


@router.post("/login")
def login(
    session: SessionDep, settings: SettingsDep, api_key: Annotated[str, Form(max_length=200)] = ""
) -> Response:
    if _tenant(session, api_key.strip()) is None:
        return sign_in("That API key is not valid (missing, wrong or revoked).", status=401)
    response = RedirectResponse("/console", status_code=303)
    response.set_cookie(
        COOKIE,
        api_key.strip(),
        httponly=True,
        samesite="strict",
        path="/console",
        secure=settings.public_url.startswith("https://"),
    )
    return response


@router.post("/logout")
def logout() -> Response:
    response = RedirectResponse("/console", status_code=303)
    response.delete_cookie(COOKIE, path="/console")
    return response


def _logout() -> str:
    return '<form method="post" action="/console/logout"><a href="/console">jobs</a> <button>Sign out</button></form>'


def _fmt(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, float):
        return f"{value:.4g}"
    return escape(str(value))


def read_artifact(session, storage: Storage, job: Job, kind: str) -> Any:
    """A succeeded job's JSON artifact of `kind`, parsed (cached by storage key), or None."""
    art = session.scalars(select(Artifact).where(Artifact.job_id == job.id, Artifact.kind == kind)).first()
    return _parsed(storage, art.storage_key) if art is not None else None


@lru_cache(maxsize=4)
def _parsed(storage: Storage, key: str) -> Any:
    return json.loads(storage.read_bytes(key))


@router.get("/jobs/{job_id}", response_class=HTMLResponse)
def job_page(
    job_id: Annotated[str, PathParam(pattern=ID_PATTERN)],
    session: SessionDep,
    storage: StorageDep,
    offset: Annotated[int, Query(ge=0, le=10**7)] = 0,
    disp_console: Annotated[str | None, Cookie()] = None,
) -> HTMLResponse:
    tenant = _tenant(session, disp_console)
    if tenant is None:
        return sign_in("Sign in to see this job.", status=401)
    job = _job(session, tenant, job_id)
    if job is None:
        return page(
            "Not found", f"<p class='err'>No job with id {escape(job_id)}.</p>{_logout()}", status=404
        )
    out = jobs.job_out(session=session, job=job)
    parts = [
        f"<h1>Job {escape(job.id)}</h1>",
        _logout(),
        f"<p>Status <b id='status'>{escape(str(out.status))}</b>"
        + (f", stage {escape(str(out.stage))}" if out.stage and out.status not in TERMINAL else "")
        + f"; defense {escape(str(job.settings.get('defense', '')))}</p>",
    ]
    if out.progress.total and out.status not in TERMINAL:
        parts.append(
            f"<p><progress value='{out.progress.done}' max='{out.progress.total}'></progress> "
            f"{out.progress.done}/{out.progress.total}"
            + (f", done about {out.eta:%H:%M:%S} UTC" if out.eta else "")
            + "</p>"
        )
    if job.error:
        parts.append(
            f"<p class='err'>{escape(str(job.error.get('code')))}: {escape(str(job.error.get('message')))}</p>"
        )
    report = read_artifact(session, storage, job, "report") if out.status == "succeeded" else None
    if report is not None:
        parts.append(_report_html(job, report, offset))
    parts.append(_events_html(session, job))
    return page(f"Job {job.id}", "".join(parts), refresh=out.status not in TERMINAL)


def _events_html(session, job: Job) -> str:
    rows = session.scalars(
        select(JobEvent).where(JobEvent.job_id == job.id).order_by(JobEvent.id.desc()).limit(30)
    )
    lines = [
        f"<tr><td>{e.created_at:%H:%M:%S}</td><td>{escape(e.type)}</td><td>{escape(e.level)}</td>"
        f"<td>{escape(e.message)}</td></tr>"
        for e in rows
    ]
    return (
        "<h2>Events (latest first)</h2><table id='events'><tr><th>time</th><th>type</th><th>level</th>"
        "<th>message</th></tr>" + "".join(lines) + "</table>"
    )


def _report_html(job: Job, report: dict, offset: int) -> str:
    summary = report.get("summary", {})
    parts = ["<h2>Report</h2>"]
    parts += [f"<p class='warn'>{escape(w)}</p>" for w in report.get("warnings", [])]
    parts.append(
        "<table id='summary'>"
        + "".join(f"<tr><th>{escape(k)}</th><td>{_fmt(v)}</td></tr>" for k, v in summary.items())
        + "</table>"
    )
    suspected = report.get("suspected", [])
    if suspected:
        rows = "".join(
            f"<tr><td>{s['rank']}</td><td>{escape(str(s['id']))}</td><td>{_fmt(s.get('saliency_max'))}</td>"
            f"<td>{escape(str(s.get('held_tokens', [])))}</td><td>{_fmt(s.get('residual'))}</td></tr>"
            for s in suspected[:20]
        )
        parts.append(
            f"<h3>Suspected samples ({len(suspected)}; first 20)</h3><table id='suspected'><tr><th>rank</th>"
            f"<th>id</th><th>saliency max</th><th>held tokens</th><th>residual</th></tr>{rows}</table>"
        )
    samples = report.get("samples", [])
    shown = samples[offset : offset + SAMPLES_PER_PAGE]
    parts.append(
        f"<h3>Samples {offset + 1 if shown else 0}-{offset + len(shown)} of {len(samples)}"
        + (
            f" (report keeps {len(samples)} of {report.get('samples_total')})"
            if report.get("samples_truncated")
            else ""
        )
        + "</h3>"
    )
    for k, row in enumerate(shown, offset):
        parts.append(_sample_html(job, k, row))
    nav = []
    if offset > 0:
        nav.append(
            f"<a href='/console/jobs/{job.id}?offset={max(0, offset - SAMPLES_PER_PAGE)}'>previous</a>"
        )
    if offset + SAMPLES_PER_PAGE < len(samples):
        nav.append(f"<a id='next' href='/console/jobs/{job.id}?offset={offset + SAMPLES_PER_PAGE}'>next</a>")
    return "".join(parts) + f"<p>{' '.join(nav)}</p>"


def _sample_html(job: Job, k: int, row: dict) -> str:
    sal = row.get("saliency") or {}
    verdict = (
        "<span class='changed'>changed</span>" if row.get("changed") else "<span class='kept'>kept</span>"
    )
    unmasked = (
        f"<div><b>purified model, unmasked</b>{' (still the original)' if row.get('residual') else ''}\n"
        f"{escape(row['unmasked_answer'])}</div>"
        if "unmasked_answer" in row
        else ""
    )
    img = (
        f"<img src='/console/jobs/{job.id}/samples/{k}.png' width='256' height='256' "
        f"alt='saliency heatmap of {escape(str(row['id']))}'>"
        if sal.get("max") is not None
        else ""
    )
    return (
        f"<div class='sample' id='sample-{k}'>{img}<div style='flex:1'>"
        f"<p><b>{escape(str(row['id']))}</b> (record {row['index']}, {escape(str(row.get('image')))}): {verdict}; "
        f"saliency max {_fmt(sal.get('max'))}, mean {_fmt(sal.get('mean'))}; first-step top-1 "
        f"{_fmt(row.get('first_step_top1'))}; held tokens {escape(str(row.get('held_tokens', [])))}</p>"
        f"<div class='answers'><div><b>original</b>\n{escape(str(row.get('original_answer', '')))}</div>"
        f"<div><b>purified</b>\n{escape(str(row.get('purified_answer', '')))}</div>{unmasked}</div></div></div>"
    )


@router.get("/jobs/{job_id}/samples/{k}.png")
def heatmap_png(
    job_id: Annotated[str, PathParam(pattern=ID_PATTERN)],
    k: Annotated[int, PathParam(ge=0, le=10**7)],
    session: SessionDep,
    settings: SettingsDep,
    storage: StorageDep,
    disp_console: Annotated[str | None, Cookie()] = None,
) -> Response:
    from disp.heatmap import heatmap

    tenant = _tenant(session, disp_console)
    job = _job(session, tenant, job_id) if tenant is not None else None
    report = read_artifact(session, storage, job, "report") if job is not None else None
    saliency = read_artifact(session, storage, job, "saliency") if report is not None else None
    rows = (report or {}).get("samples", [])
    if saliency is None or k >= len(rows) or rows[k]["id"] not in saliency.get("saliency", {}):
        return Response(status_code=404)
    row = rows[k]
    try:
        img = heatmap(
            _image(session.get(Dataset, job.dataset_id), row["image"], settings, storage),
            saliency["saliency"][row["id"]],
            row.get("held_tokens", []),
        )
    except ValueError:  # an anyres image: no grid to draw
        return Response(status_code=404)
    buf = io.BytesIO()
    img.save(buf, format="PNG")
    return Response(buf.getvalue(), media_type="image/png", headers={"Cache-Control": "private, max-age=300"})


def _image(dataset: Dataset, name: str, settings: ApiSettings, storage: Storage):
    """The sample's image from the dataset archive, or None when the archive is over the console's limit or
    the image cannot be read."""
    if dataset is None or dataset.bytes > settings.console_max_archive_bytes:
        return None
    try:
        folder = str(settings.console_cache_dir or "")
        return _dataset(dataset.id, dataset.storage_key, dataset.archive_format, folder, storage).source.open(
            name
        )
    except Exception:  # a missing or unreadable image: drawn over grey
        return None


@lru_cache(maxsize=4)
def _dataset(dataset_id: str, key: str, fmt: str, cache_dir: str, storage: Storage):
    """The dataset (`disp.formats.read_dataset`) of a downloaded archive, downloaded once per process."""
    from disp.formats import read_dataset

    folder = Path(cache_dir or tempfile.gettempdir()) / "disp-console" / dataset_id
    archive = folder / f"archive.{'zip' if fmt == 'zip' else 'tar'}"
    if not archive.is_file():
        folder.mkdir(parents=True, exist_ok=True)
        tmp = folder / f".download-{os.getpid()}-{os.urandom(4).hex()}"
        storage.download(key, tmp)
        tmp.replace(archive)
    return read_dataset(archive)
