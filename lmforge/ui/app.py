"""`lmforge ui`: the runs dashboard and the preference-annotation app, one FastAPI app.

Reads `--runs` and never writes there; writes only labels, into the sessions under
`--labels` (one fsynced line per label, see annotate.py). Loopback by default. Bound to any
other address it needs `--token`, checked on every request (an `Authorization: Bearer`
header, or `?token=` once, which sets an HttpOnly cookie for the pages that follow). On
loopback a request naming another Host is refused (DNS rebinding), and a form posted from
another origin is refused (a web page cannot label on someone's behalf).
"""

from __future__ import annotations

import argparse
import hmac
import ipaddress
import sys
import threading
import time
import traceback
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import parse_qs, urlsplit

from lmforge.annotate import ITEMS, SESSION, Session, Shown, load_session
from lmforge.errors import UserError
from lmforge.ui import pages_annotate as A
from lmforge.ui import pages_runs as R
from lmforge.ui.html import e, page
from lmforge.ui.runs import Stage, curves, inside, read_stage, stages

try:  # an extra; FastAPI reads the route signatures' (string) annotations from these globals
    from fastapi import Request
    from fastapi.responses import Response
except ImportError:  # `ui_cli` says what to install
    Request = Response = Any  # type: ignore[misc,assignment]

if TYPE_CHECKING:
    from fastapi import FastAPI

STATIC = Path(__file__).parent / "static"
TYPES = {".js": "text/javascript", ".css": "text/css", ".png": "image/png", ".svg":
         "image/svg+xml", ".jpg": "image/jpeg", ".json": "application/json", ".jsonl":
         "text/plain", ".yaml": "text/plain", ".md": "text/plain", ".txt": "text/plain"}
CACHED_CURVES = 64  # parsed metrics files kept (a dashboard shows a few stages at a time)
MAX_POINTS = 4000  # per series sent to a chart: a long run is thinned by stride, last kept
COOKIE = "lmforge_ui_token"
LOOPBACK_NAMES = {"localhost", "127.0.0.1", "::1", "[::1]"}
CSP = ("default-src 'self'; script-src 'self'; style-src 'self' 'unsafe-inline'; "
       "img-src 'self' data:; frame-ancestors 'none'; form-action 'self'")


class NotFound(Exception):
    pass


def is_loopback(host: str) -> bool:
    if host.strip("[]") in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def thin(points: list[tuple[int, float]], limit: int = MAX_POINTS) -> list[list[float]]:
    """[[steps], [values]], every k-th point of a long series (its last always kept)."""
    if len(points) > limit:
        k = -(-len(points) // limit)
        points = points[::k] + ([points[-1]] if (len(points) - 1) % k else [])
    return [[p[0] for p in points], [p[1] for p in points]]


class Dashboard:
    """What the routes read: stages under the runs root, sessions under the labels root."""

    def __init__(self, runs: Path, labels: Path | None) -> None:
        self.runs, self.labels = runs.resolve(), labels.resolve() if labels else None
        self.lock = threading.Lock()  # one label written (and the exports rebuilt) at a time
        self._sessions: dict[Path, tuple[float, Session]] = {}
        self._curves: dict[Path, tuple[tuple[int, int], Any]] = {}
        self.cache_lock = threading.Lock()

    def curves(self, stage: Stage) -> tuple[dict[str, list[tuple[int, float]]], list[str]]:
        """A stage's metrics, parsed once per version of the file: a page and the chart
        script's request right after it read it once; a running stage's grows and is read
        again."""
        path = stage.path / "metrics.jsonl"
        try:
            st = path.stat()
            version = (st.st_mtime_ns, st.st_size)
        except OSError:
            return {}, []
        cached = self._curves.get(path)
        if cached is None or cached[0] != version:
            cached = (version, curves(path))
            with self.cache_lock:  # routes run in a thread pool
                if len(self._curves) >= CACHED_CURVES:
                    self._curves.pop(next(iter(self._curves)))  # the oldest entry
                self._curves[path] = cached
        return cached[1]

    def stage(self, name: str) -> Stage:
        d = inside(self.runs, name)
        if d is None or d == self.runs or not d.is_dir() or not (
                (d / "config.yaml").is_file() or (d / "summary.json").is_file()):
            raise NotFound(f"no stage {name!r} under the runs directory")
        return read_stage(self.runs, d)

    def series(self, names: list[str], wanted: list[str]) -> dict[str, Any]:
        out: dict[str, Any] = {}
        every: set[str] = set()
        for name in names:
            st = self.stage(name)
            got, problems = self.curves(st)
            every |= set(got)
            out[name] = {"state": st.state, "problems": problems,
                         "metrics": {m: thin(v) for m, v in got.items() if m in wanted}}
        return {"stages": out, "names": sorted(every)}

    def session(self, name: str) -> Session:
        d = inside(self.labels, name) if self.labels else None
        if d is None or not (d / SESSION).is_file():
            raise NotFound(f"no annotation session {name!r}")
        mtime = max((f.stat().st_mtime if f.exists() else 0.0) for f in (d / SESSION, d / ITEMS))
        cached = self._sessions.get(d)
        if cached is None or cached[0] != mtime:
            cached = (mtime, load_session(d))
            self._sessions[d] = cached
        return cached[1]

    def sessions(self) -> dict[str, Session | str]:
        if self.labels is None or not self.labels.is_dir():
            return {}
        found: dict[str, Session | str] = {}
        for d in sorted(p.parent for p in self.labels.glob(f"*/{SESSION}")):
            try:
                found[d.name] = self.session(d.name)
            except UserError as err:
                found[d.name] = str(err)
        return found

    def judges(self) -> list[tuple[str, dict[str, Any]]]:
        return [(s.name, s.summary["judge"]) for s in stages(self.runs)
                if s.summary and isinstance(s.summary.get("judge"), dict)]

    def label(self, name: str, form: dict[str, str]) -> str:
        """One label from the page's form; returns the annotator. A comparison not in their
        order is refused; one they already labelled (a form sent twice) is not added again."""
        s = self.session(name)
        who = annotator_name(form.get("annotator", ""))
        shown = Shown(form.get("item", ""), form.get("left", ""), form.get("right") or None)
        if shown not in s.order(who):
            raise UserError(f"{shown.item!r} ({shown.left} | {shown.right}) is not in "
                            f"{who}'s comparisons of session {name}")
        with self.lock:
            rec = s.record()
            if shown.key not in rec.done(who):
                rec.add(who, shown, form.get("choice", ""), form.get("reason", "").strip()[:2000])
        return who


def annotator_name(raw: str) -> str:
    name = raw.strip()
    if not name or len(name) > 64 or any(ord(c) < 32 for c in name):
        raise UserError("an annotator name is 1 to 64 printable characters")
    return name


def refuse(status: int, text: str) -> Response:
    from fastapi.responses import HTMLResponse

    return HTMLResponse(page(f"{status}", f"<p>{e(text)}</p>"), status_code=status)


def create_app(runs: Path, labels: Path | None = None, token: str | None = None,
               loopback: bool = True) -> FastAPI:
    from fastapi import FastAPI

    board = Dashboard(runs, labels)
    app = FastAPI(title="lmforge ui", docs_url=None, redoc_url=None, openapi_url=None)
    _protect(app, token, loopback)
    _run_routes(app, board)
    _annotation_routes(app, board)
    return app


def _protect(app: FastAPI, token: str | None, loopback: bool) -> None:
    """The checks every request passes, and one page for every error (the app stays up)."""
    from starlette.exceptions import HTTPException

    @app.middleware("http")
    async def guard(request: Request, call_next: Any) -> Response:
        host = request.headers.get("host", "")
        hostname = urlsplit(f"//{host}").hostname or ""
        if loopback and not is_loopback(hostname):
            return refuse(400, f"host {host!r} is not this loopback server's")
        origin = request.headers.get("origin")
        if request.method == "POST" and origin and urlsplit(origin).netloc != host:
            return refuse(403, "a form from another site")
        given = request.query_params.get("token")
        if token:
            header = request.headers.get("authorization", "")
            sent = (header[7:] if header.startswith("Bearer ") else None) \
                or request.cookies.get(COOKIE) or given or ""
            if not hmac.compare_digest(sent.encode(), token.encode()):
                return refuse(401, "this server needs its token: open it once as "
                                   "/?token=TOKEN (or send Authorization: Bearer TOKEN)")
        resp = await call_next(request)
        if token and given:
            resp.set_cookie(COOKIE, token, httponly=True, samesite="strict")
        # same-origin, not no-referrer: under no-referrer a browser sends `Origin: null` with
        # the page's own forms, which the check above must refuse
        resp.headers.update({"Content-Security-Policy": CSP, "X-Content-Type-Options":
                             "nosniff", "Referrer-Policy": "same-origin"})
        return resp

    @app.exception_handler(NotFound)
    async def not_found(request: Request, err: NotFound) -> Response:
        return refuse(404, str(err))

    @app.exception_handler(HTTPException)
    async def http_error(request: Request, err: HTTPException) -> Response:
        return refuse(err.status_code, str(err.detail))

    @app.exception_handler(UserError)
    async def user_error(request: Request, err: UserError) -> Response:
        return refuse(400, str(err))

    @app.exception_handler(Exception)
    async def bug(request: Request, err: Exception) -> Response:
        traceback.print_exception(err, file=sys.stderr)  # the page shows one line
        return refuse(500, f"{type(err).__name__}: {str(err).splitlines()[0] if str(err) else ''}")


def _run_routes(app: FastAPI, board: Dashboard) -> None:
    from fastapi import Query
    from fastapi.responses import FileResponse, HTMLResponse, JSONResponse

    @app.get("/")
    def index() -> Response:
        return HTMLResponse(R.runs_page(stages(board.runs), board.runs, time.time()))

    @app.get("/stage/{name:path}")
    def stage(name: str, samples: str | None = None) -> Response:
        st = board.stage(name)
        names = sorted(board.curves(st)[0])
        return HTMLResponse(R.stage_page(st, names, stages(board.runs), samples, time.time()))

    @app.get("/compare")
    def compare(s: list[str] | None = Query(None)) -> Response:
        chosen = [board.stage(n) for n in dict.fromkeys(s or [])]
        if not chosen:
            raise UserError("tick at least one stage to compare")
        names = sorted(set().union(*(board.curves(c)[0] for c in chosen)))
        return HTMLResponse(R.compare_page(chosen, names))

    @app.get("/report/{run:path}")
    def report(run: str) -> Response:
        d = inside(board.runs, run)
        if d is None or not (d / "report.md").is_file():
            raise NotFound(f"no report for run {run!r}")
        rel = d.relative_to(board.runs).as_posix()

        def src(link: str) -> str | None:
            target = inside(d, link)
            return f"/file/{rel}/{link}" if target is not None and target.is_file() else None

        return HTMLResponse(R.report_page(run, d / "report.md", src))

    @app.get("/file/{path:path}")
    def file(path: str) -> Response:
        f = inside(board.runs, path)
        if f is None or not f.is_file() or f.suffix.lower() not in TYPES:
            raise NotFound(f"no file {path!r} to show")
        return FileResponse(f, media_type=TYPES[f.suffix.lower()])

    @app.get("/static/{path:path}")
    def static(path: str) -> Response:
        f = inside(STATIC, path)
        if f is None or not f.is_file() or f.suffix not in TYPES:
            raise NotFound(f"no static file {path!r}")
        return FileResponse(f, media_type=TYPES[f.suffix], headers={"Cache-Control": "no-cache"})

    @app.get("/favicon.ico")
    def favicon() -> Response:
        return Response(status_code=204)

    @app.get("/api/stages")
    def api_stages() -> Response:
        return JSONResponse([{"name": s.name, "state": s.state, "updated": s.updated,
                              "problems": s.problems} for s in stages(board.runs)])

    @app.get("/api/curves")
    def api_curves(s: list[str] | None = Query(None), m: list[str] | None = Query(None)) -> Response:
        return JSONResponse(board.series(list(dict.fromkeys(s or [])), m or []))


def _annotation_routes(app: FastAPI, board: Dashboard) -> None:
    from fastapi.responses import FileResponse, HTMLResponse, RedirectResponse

    @app.get("/annotate")
    def annotate() -> Response:
        return HTMLResponse(A.sessions_page(board.sessions()))

    @app.get("/annotate/{name:path}/results")
    def results(name: str) -> Response:
        return HTMLResponse(A.results_page(name, board.session(name), board.judges()))

    @app.get("/annotate/{name:path}/files/{file}")
    def session_file(name: str, file: str) -> Response:
        s = board.session(name)
        if file not in ("labels.jsonl", "preferences.jsonl", "kto.jsonl") or \
                not (s.root / file).is_file():
            raise NotFound(f"no {file!r} in session {name!r}")
        return FileResponse(s.root / file, media_type="text/plain")

    @app.post("/annotate/{name:path}/label")
    async def label(name: str, request: Request) -> Response:
        raw = (await request.body()).decode("utf-8", errors="replace")
        form = {k: v[0] for k, v in parse_qs(raw, keep_blank_values=True).items()}
        who = board.label(name, form)
        return RedirectResponse(A.url(name, who), status_code=303)

    # last: `{name:path}` would take the routes above as session names
    @app.get("/annotate/{name:path}")
    def session(name: str, annotator: str | None = None) -> Response:
        s = board.session(name)
        if annotator is None:
            return HTMLResponse(A.name_page(name, s))
        who = annotator_name(annotator)
        order = s.order(who)
        at = s.record().next_index(who, order)
        return HTMLResponse(A.label_page(name, s, who, at, len(order),
                                         order[at] if at < len(order) else None))


def ui_cli(ns: argparse.Namespace) -> None:
    """`lmforge ui [--runs DIR] [--labels DIR] [--host H] [--port P] [--token T]`."""
    try:
        import fastapi  # noqa: F401
        import uvicorn
    except ImportError:
        raise UserError("lmforge ui needs fastapi and uvicorn: pip install 'lmforge[serve]'") from None
    runs = Path(ns.runs)
    if not runs.is_dir():
        raise UserError(f"--runs {runs}: no such directory")
    loopback = is_loopback(ns.host)
    if not loopback and not ns.token:
        raise UserError(f"--host {ns.host} is reachable from other machines: give --token "
                        "(every request must carry it)")
    labels = Path(ns.labels) if ns.labels else None
    if labels is not None and labels.exists() and not labels.is_dir():
        raise UserError(f"--labels {labels}: not a directory")
    board = Dashboard(runs, labels)
    shown = f"http://{ns.host}:{ns.port}/" + (f"?token={ns.token}" if ns.token else "")
    print(f"lmforge ui: {shown} (runs: {runs}, {len(stages(board.runs))} stages; "
          f"labels: {labels or 'none'}, {len(board.sessions())} sessions)", flush=True)
    uvicorn.run(create_app(runs, labels, ns.token, loopback), host=ns.host, port=ns.port,
                log_level="warning")
