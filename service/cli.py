"""The `converge` command line. Every command but `diagnose` reads CONVERGE_DATABASE_URL.

Heavy modules (optuna, the API, the worker) are imported inside the commands so that
`converge --help` answers at once, and `converge diagnose` never imports torch. Exit codes:
0 ok, 1 a service error (database unreachable, name taken, not found), 2 bad input
(invalid spec or history, bad option).
"""

from __future__ import annotations

import logging
import os
import signal
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import click

from converge.core.errors import Invalid, ServiceError
from converge.core.settings import get_settings
from converge.core.version import VERSION
from converge.studies.spec import PARAM_NAMES, SpecError, load_spec_file


class ConvergeGroup(click.Group):
    """Turns Converge's own errors into one line on stderr and an exit code, never a traceback.

    A database failure that reaches here as a driver error, or wrapped (Optuna's RDBStorage turns
    every driver error into its StorageInternalError), is reported as the service's own error too
    (`core.db.engine.as_service_error`): unreachable, not upgraded, read-only or full.
    """

    def invoke(self, ctx: click.Context) -> Any:
        try:
            return super().invoke(ctx)
        except Invalid as exc:  # a spec, history or schedule with problems
            click.echo(f"converge: {exc}", err=True)
            ctx.exit(2)
        except ServiceError as exc:
            click.echo(f"converge: {exc}", err=True)
            ctx.exit(1)
        except Exception as exc:
            found = _database_error(exc)
            if found is None:
                raise
            click.echo(f"converge: {' '.join(str(found).split())}", err=True)
            ctx.exit(1)


def _database_error(exc: Exception) -> ServiceError | None:
    """The service error a database failure amounts to, or None for anything else (click's own exits included)."""
    if isinstance(exc, (click.exceptions.ClickException, click.exceptions.Exit, click.exceptions.Abort)):
        return None
    from converge.core.db.engine import as_service_error

    return as_service_error(exc, get_settings().database_url)


# Commands that run until stopped wait out a database outage (`core.db.engine.retry_transient`);
# every other command says at once what is wrong. `diagnose` uses no database.
_PATIENT_COMMANDS = {"serve", "worker", "sweep", "scheduler", "diagnose"}


def _setup_logging(verbose: bool = False) -> None:
    """Text logs, or JSON lines with CONVERGE_LOG_FORMAT=json (`core.logs`)."""
    from converge.core.logs import configure

    configure(get_settings().log_format, logging.DEBUG if verbose else logging.INFO)


@click.group(cls=ConvergeGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(VERSION, prog_name="converge")
@click.pass_context
def cli(ctx: click.Context) -> None:
    """Converge: hyperparameter sweeps with a convergence diagnosis for every trial.

    The database is CONVERGE_DATABASE_URL (default sqlite:///./converge.db); run
    `converge db upgrade` once before anything else.
    """
    if ctx.invoked_subcommand not in _PATIENT_COMMANDS:
        from converge.core.db.engine import waiting_at_most

        ctx.with_resource(waiting_at_most(0))


# ---------------------------------------------------------------- db


@cli.group(cls=ConvergeGroup)
def db() -> None:
    """Database schema commands."""


@db.command("upgrade")
def db_upgrade() -> None:
    """Create or upgrade Optuna's and Converge's schemas (idempotent)."""
    from converge.core.db.engine import safe_url
    from converge.core.db.migrate import upgrade

    url = get_settings().database_url
    versions = upgrade(url)
    click.echo(f"{safe_url(url)}: optuna schema {versions['optuna']}, converge schema {versions['converge']}")


# ---------------------------------------------------------------- serve / worker


@cli.command()
@click.option("--host", default="127.0.0.1", show_default=True,
              help="address to bind; one that is not loopback only once an API token exists")
@click.option("--port", default=8000, show_default=True, type=click.IntRange(1, 65535), help="port to bind")
@click.option("--workers", default=1, show_default=True, type=click.IntRange(0, 64),
              help="local `converge worker` processes to start (0: API only)")
@click.option("--demo-spec", type=click.Path(exists=True, dir_okay=False, path_type=Path),
              help="submit this study spec when the database holds no study yet")
def serve(host: str, port: int, workers: int, demo_spec: Path | None) -> None:
    """The API, the dashboard at /dashboard, the scheduler, and local worker(s), on one port.

    The scheduler (`converge scheduler` runs it alone) fires schedules' runs once per fire time,
    also with several servers on one PostgreSQL; it checks every CONVERGE_SCHEDULER_POLL_S (5 s).

    Once an API token exists (`converge token create`), every request but /v1/health needs one.
    While none does, the API is open, so serve listens on a loopback address only (127.0.0.1,
    ::1, localhost): another --host is refused (exit status 2) until a token exists. A server
    on another host keeps requiring a token even if every token is later revoked. While it is
    open, it answers only requests whose Host is the bound address, localhost, 127.0.0.1 or ::1
    (400 otherwise: no DNS rebinding); CONVERGE_ALLOWED_HOSTS adds names, and once set applies
    with tokens too.

    Request bodies over CONVERGE_MAX_BODY_BYTES (1 MiB) are refused with 413, the dashboard's too.
    """
    import uvicorn

    from converge.core.db import repo
    from converge.core.db.engine import get_engine, session_scope
    from converge.core.db.migrate import check_schema
    from converge.core.heap import freeze_startup_heap
    from converge.service import auth
    from converge.service.api.app import create_app

    _setup_logging()
    settings = get_settings()
    check_schema(settings.database_url)
    loopback = auth.is_loopback(host)
    if not loopback and not auth.auth_enabled(get_engine(settings.database_url)):
        click.echo(f"converge: refusing to listen on {host}: no API token exists, so the API and the dashboard "
                   "would be open to anyone who can reach it. Create one first with "
                   "`converge token create --scope admin`, or bind to 127.0.0.1.", err=True)
        click.get_current_context().exit(2)
    if demo_spec is not None:
        spec = load_spec_file(demo_spec)
        with session_scope(get_engine(settings.database_url)) as session:
            empty = repo.count_studies(session) == 0
        if empty:
            from converge.studies.lifecycle import submit_study

            submit_study(settings, spec)
            click.echo(f"submitted demo study {spec.name!r}")
    from converge.service.scheduler import Scheduler

    children = [_start_local_worker() for _ in range(workers)]
    scheduler = Scheduler(settings)
    scheduler.start_thread()  # a thread, not a process: it only creates studies (see service/scheduler.py)
    try:
        # With JSON logs uvicorn configures no logging of its own: its loggers reach the JSON root handler.
        app = create_app(settings, require_token=not loopback, bound_host=host, bound_port=port)
        freeze_startup_heap()  # collections then skip the app and its libraries: no 100 ms pauses under load
        uvicorn.run(app, host=host, port=port, log_level="info",
                    **({"log_config": None} if settings.log_format == "json" else {}))
    finally:
        scheduler.stop()
        _stop_processes(children)


def _start_local_worker() -> subprocess.Popen[bytes]:
    """A `converge worker` of its own: the API process never imports torch."""
    return subprocess.Popen([sys.executable, "-m", "converge.service.cli", "worker"], env=os.environ.copy())


def _stop_processes(processes: list[subprocess.Popen[bytes]], timeout_s: float = 30.0) -> None:
    for p in processes:
        if p.poll() is None:
            p.send_signal(signal.SIGTERM)
    deadline = time.monotonic() + timeout_s
    for p in processes:
        try:
            p.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            p.kill()


@cli.group(invoke_without_command=True)
@click.option("--devices", default="auto", show_default=True,
              help="auto (every visible GPU, else the CPU), cpu, or cuda:0,1,...")
@click.option("--slots-per-device", default=1, show_default=True, type=click.IntRange(1, 64),
              help="trials run at once on each device")
@click.option("--exit-when-idle", is_flag=True, help="exit once no study has trial slots left (batch jobs)")
@click.pass_context
def worker(ctx: click.Context, devices: str, slots_per_device: int, exit_when_idle: bool) -> None:
    """Claim trials of queued and running studies and run them, one process per slot.

    A trial whose process dies is failed and rerun (up to the spec's `retries`). SIGTERM or
    Ctrl-C: no new trials; running ones stop at their epoch's end, are rerun by the next
    worker, and this one exits (a second signal kills them at once).
    `converge worker list` shows the workers sharing this database instead.
    """
    if ctx.invoked_subcommand is not None:
        return
    from converge.core.db.migrate import check_schema
    from converge.studies.devices import parse_devices, plan_slots
    from converge.studies.worker import Worker

    _setup_logging()
    settings = get_settings()
    try:
        slots = plan_slots(parse_devices(devices), slots_per_device)
    except ValueError as exc:
        raise click.BadParameter(str(exc), param_hint="--devices") from None
    check_schema(settings.database_url)
    Worker(settings, slots, exit_when_idle=exit_when_idle).run()


@worker.command("list")
def worker_list() -> None:
    """The workers sharing this database: host, pid, devices, slots, state, current trials, last heartbeat."""
    from converge.core.db.engine import get_engine, session_scope
    from converge.service import views

    settings = get_settings()
    with session_scope(get_engine(settings.database_url)) as session:
        workers = views.list_worker_outs(session, settings.grace_period_s)
    rows = [["id", "host", "pid", "devices", "slots", "state", "trials now", "last heartbeat"]]
    for w in workers:
        state = w.state if w.alive or w.state == "stopped" else f"{w.state} (no heartbeat)"
        trials = ", ".join(f"{t.study}#{t.trial if t.trial is not None else '?'}@{t.device}"
                           for t in w.current_trials) or "-"
        rows.append([w.id[:12], w.host, str(w.pid), w.devices, str(w.slots), state, trials,
                     w.last_heartbeat.strftime("%Y-%m-%d %H:%M:%S UTC")])
    click.echo(_table(rows) if workers else "no workers have registered in the last day")


# ---------------------------------------------------------------- token


@cli.group(cls=ConvergeGroup)
def token() -> None:
    """API tokens for the REST API and the dashboard.

    Once a token exists, every request but /v1/health needs one: `Authorization: Bearer TOKEN`,
    or the token as the HTTP Basic password in the dashboard. Scopes: read (every GET and
    POST /v1/diagnose; the dashboard's pages), write (also create, cancel and repair studies),
    admin (also everything the dashboard can change). Only a hash of each token is stored.
    """


@token.command("create")
@click.option("--scope", required=True, type=click.Choice(["read", "write", "admin"]),  # service.auth.SCOPES
              help="what the token may do: read < write < admin, each including the ones before it")
@click.option("--name", default=None, help="a label to tell tokens apart in `converge token list`")
def token_create(scope: str, name: str | None) -> None:
    """Create a token and print it: the only time it is shown.

    Only its hash is stored, so it cannot be shown again. The token alone goes to stdout
    (`TOKEN=$(converge token create --scope read)` works); the note about it goes to stderr.
    Authentication is on from the first token on.
    """
    from converge.core.db.engine import get_engine
    from converge.service import auth

    engine = get_engine(get_settings().database_url)
    first = not auth.auth_enabled(engine)
    secret, info = auth.create_token(engine, scope, name)
    click.echo(secret)
    click.echo(f"token {info.id} ({info.scope}{f', {info.name!r}' if info.name else ''}) created; it cannot be "
               "shown again: store it now", err=True)
    if first:
        click.echo("authentication is now on: every request but /v1/health needs a token", err=True)


@token.command("list")
def token_list() -> None:
    """Every token: id, name, scope, prefix, created, last used, revoked.

    The prefix is the token's first 12 characters (the token itself is not stored); `last used`
    is updated at most once a minute.
    """
    from converge.core.db.engine import get_engine
    from converge.service import auth

    tokens = auth.list_tokens(get_engine(get_settings().database_url))
    rows = [["id", "name", "scope", "prefix", "created", "last used", "revoked"]]
    for t in tokens:
        rows.append([str(t.id), t.name or "-", t.scope, f"{t.prefix}...", _when(t.created_at), _when(t.last_used_at),
                     _when(t.revoked_at)])
    click.echo(_table(rows) if tokens else "no API tokens: the API is open (`converge token create` makes one)")


@token.command("revoke")
@click.argument("token_id", metavar="ID", type=int)
def token_revoke(token_id: int) -> None:
    """Revoke a token by its id: it is refused from the next request on.

    `converge token list` shows the ids. An unknown id is an error (exit status 1); revoking a
    revoked token changes nothing.
    """
    from converge.core.db.engine import get_engine
    from converge.service import auth

    info, revoked_now, left = auth.revoke_token(get_engine(get_settings().database_url), token_id)
    click.echo(f"token {info.id} ({info.prefix}...) " + ("revoked" if revoked_now else
                                                         f"was already revoked at {_when(info.revoked_at)}"))
    if revoked_now and not left:
        click.echo("no active token is left: a server on loopback is open again; one started with another --host "
                   "refuses every request until a token exists", err=True)


def _when(moment: Any) -> str:
    return moment.strftime("%Y-%m-%d %H:%M:%S UTC") if moment is not None else "-"


# ---------------------------------------------------------------- sweep


@cli.command()
@click.option("--spec", "spec_path", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="study spec, YAML or JSON")
@click.option("--quiet", is_flag=True, help="no progress bar")
def sweep(spec_path: Path, quiet: bool) -> None:
    """Run one study to completion here, with a progress bar, then print its trials.

    Re-running the same spec resumes an unfinished study of that name.
    """
    import optuna

    from converge.core.db.migrate import check_schema
    from converge.studies.sweep import run_sweep

    spec = load_spec_file(spec_path)
    settings = get_settings()
    check_schema(settings.database_url)
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    from converge.studies.runner import StudySetupError

    try:
        run_sweep(settings, spec, progress=not quiet)
    except StudySetupError as exc:
        raise click.ClickException(f"study {spec.name!r} failed: {exc}") from None
    _show_study(spec.name)


# ---------------------------------------------------------------- diagnose


# `converge diagnose` reads its input in bounded chunks and never past these caps, so that no input (`/dev/zero`,
# an endless pipe, a huge file) can make it read until memory runs out. Both are far above any real history:
# 10,000 epochs (the most `studies.diagnosis` diagnoses) of every metric are about 2 MB of JSON.
MAX_DIAGNOSE_INPUT_BYTES = 64 * 1024 * 1024  # one FILE or stdin, --jsonl or not: past it, reading stops
MAX_DIAGNOSE_LINE_BYTES = 4 * 1024 * 1024  # one --jsonl line: a longer one is an error line, skipped unread
_READ_CHUNK_BYTES = 1024 * 1024


class _InputTooLarge(Exception):
    """The input passed MAX_DIAGNOSE_INPUT_BYTES; reading stopped there."""


@cli.command("diagnose")
@click.argument("source", metavar="FILE|-", type=click.File("rb"))
@click.option("--jsonl", is_flag=True,
              help="one history per input line; prints one compact diagnosis per line, in the same order; "
                   "exit status 2 if any line could not be diagnosed, else 0")
def diagnose_command(source: IO[bytes], jsonl: bool) -> None:
    """Diagnose a training history: why it did or did not converge, and what to change.

    FILE is a JSON history in the diagnosis contract's format (`-` reads stdin), such as the
    body of GET /v1/studies/NAME/trials/N/metrics?layout=history; NaN and infinities may be bare tokens or the
    strings "NaN", "Infinity", "-Infinity". Prints the diagnosis as JSON. Needs no database.

    An invalid JSON file or history: one line on stderr, exit status 2. So is input that cannot be read:
    not UTF-8 text, nested too deeply, a number too long, or over the size limit.

    With --jsonl, every input line is a history and every output line its diagnosis. A line
    that cannot be diagnosed (empty, invalid JSON, invalid history) prints
    {"line": N, "error": "..."} in its place, so output lines stay aligned with input lines;
    the other lines go on, and the exit status is then 2 (0 when every line was diagnosed).

    Limits: at most 64 MiB of input is read (a larger FILE or stdin is refused, exit status 2;
    with --jsonl the lines before the limit are diagnosed and reading stops there), and with
    --jsonl at most 4 MiB per line (a longer line is an error line of its own).
    """
    import json

    ctx = click.get_current_context()
    if not jsonl:
        try:
            text = _read_capped(source, MAX_DIAGNOSE_INPUT_BYTES).decode("utf-8")
            if "\r" in text:  # as a text-mode read would see it (universal newlines), so error positions agree
                text = text.replace("\r\n", "\n").replace("\r", "\n")
            result = _diagnose_text(text)
        except Invalid as exc:  # an invalid history: exit 2 like any invalid input (ConvergeGroup), named by its file
            exc.source = source.name
            raise
        except _InputTooLarge:
            click.echo(f"converge: {source.name}: larger than the {_mib(MAX_DIAGNOSE_INPUT_BYTES)} limit of "
                       "`converge diagnose` input; nothing was diagnosed", err=True)
            ctx.exit(2)
        except UnicodeDecodeError as exc:
            click.echo(f"converge: {source.name}: not UTF-8 text: {exc}", err=True)
            ctx.exit(2)
        except json.JSONDecodeError as exc:
            click.echo(f"converge: {source.name}: not valid JSON: {exc}", err=True)
            ctx.exit(2)
        except ValueError as exc:  # unreadable JSON, worded by `_diagnose_text`
            click.echo(f"converge: {source.name}: {exc}", err=True)
            ctx.exit(2)
        except OSError as exc:
            click.echo(f"converge: {source.name}: cannot read it: {exc.strerror or exc}", err=True)
            ctx.exit(2)
        click.echo(json.dumps(result, indent=2))
        return

    reader = _LineReader(source, MAX_DIAGNOSE_LINE_BYTES, MAX_DIAGNOSE_INPUT_BYTES)
    lines = bad = 0
    rows = iter(reader)
    while True:
        try:  # a read error only: one writing the output (a closed pipe) is not the input's
            line = next(rows)
        except StopIteration:
            break
        except OSError as exc:
            click.echo(f"converge: {source.name}: cannot read it after line {lines}: {exc.strerror or exc}",
                       err=True)
            ctx.exit(2)
        lines += 1
        out = _diagnose_line(line, lines)
        bad += "error" in out
        click.echo(json.dumps(out, separators=(",", ":")))
    if reader.stopped:
        click.echo(f"converge: {source.name}: reading stopped at the {_mib(MAX_DIAGNOSE_INPUT_BYTES)} limit of "
                   f"`converge diagnose` input, in line {lines}; {bad} of {lines} lines could not be diagnosed",
                   err=True)
        ctx.exit(2)
    if bad:
        click.echo(f"converge: {bad} of {lines} lines could not be diagnosed", err=True)
        ctx.exit(2)


def _mib(size: int) -> str:
    return f"{size // (1024 * 1024)} MiB"


def _read_capped(stream: IO[bytes], limit: int) -> bytes:
    """All of `stream`, read in chunks; `_InputTooLarge` once it passes `limit` bytes (one byte more is read)."""
    read = getattr(stream, "read1", stream.read)
    chunks: list[bytes] = []
    total = 0
    while chunk := read(min(_READ_CHUNK_BYTES, limit + 1 - total)):
        total += len(chunk)
        if total > limit:
            raise _InputTooLarge
        chunks.append(chunk)
    return b"".join(chunks)


# A line `_LineReader` did not keep: longer than its line limit, or where its input limit stopped the reading.
_LONG_LINE, _CUT_LINE = object(), object()


class _LineReader:
    """The lines of a byte stream as a text-mode file splits them (at \\n, \\r\\n or \\r; without these),
    read in chunks: each line's bytes, or `_LONG_LINE` for a line over `max_line` bytes (never held whole:
    the rest of it is dropped as it is read). Reading stops after `max_total` bytes: the line it stopped
    in is then the last one, `_CUT_LINE` (or `_LONG_LINE`), and `stopped` is True."""

    def __init__(self, stream: IO[bytes], max_line: int, max_total: int, chunk_bytes: int = _READ_CHUNK_BYTES):
        self.stream, self.max_line, self.max_total, self.chunk_bytes = stream, max_line, max_total, chunk_bytes
        self.stopped = False

    def __iter__(self) -> Iterator[bytes | object]:
        read = getattr(self.stream, "read1", self.stream.read)  # read1: what a pipe has now, not a whole chunk
        line = bytearray()
        long = False  # the line passed max_line: the rest of it is dropped
        after_cr = False  # the previous chunk ended in \r: a \n starting this one belongs to it
        left = self.max_total
        while chunk := read(min(self.chunk_bytes, left + 1)):  # a byte past the limit tells it from the end
            if len(chunk) > left:
                chunk, self.stopped = chunk[:left], True
            left -= len(chunk)
            pos = 1 if after_cr and chunk.startswith(b"\n") else 0
            after_cr = False
            size = len(chunk)
            nl, cr = chunk.find(b"\n", pos), chunk.find(b"\r", pos)
            while pos < size:
                if 0 <= nl < pos:  # each search runs once per line ending, so a chunk is scanned in linear time
                    nl = chunk.find(b"\n", pos)
                if 0 <= cr < pos:
                    cr = chunk.find(b"\r", pos)
                end = min(nl if nl >= 0 else size, cr if cr >= 0 else size)
                if not long:
                    line += chunk[pos:end]
                    if len(line) > self.max_line:
                        line, long = bytearray(), True
                if end == size:  # the line goes on in the next chunk
                    break
                yield _LONG_LINE if long else bytes(line)
                line, long = bytearray(), False
                pos = end + 1
                if end == cr:  # \r\n is one line ending
                    if pos < size and chunk[pos] == 0x0A:
                        pos += 1
                    elif pos == size:
                        after_cr = True
            if self.stopped:
                yield _LONG_LINE if long else _CUT_LINE
                return
        if line or long:
            yield _LONG_LINE if long else bytes(line)


def _diagnose_text(text: str) -> dict[str, Any]:
    """The diagnosis of one JSON history. Raises `json.JSONDecodeError` for text that is not JSON, else a
    `HistoryError` (an `Invalid`) for an invalid history, else a ValueError whose message says what is wrong with it."""
    from converge.service.json_input import TOO_DEEP, JSONInputError, loads
    from converge.studies.diagnosis import diagnose

    try:
        return diagnose(loads(text)).to_dict()
    except JSONInputError as exc:
        raise ValueError(f"cannot read its JSON: {exc}") from None
    except RecursionError:  # nesting that json.loads took but a later step did not
        raise ValueError(f"cannot read its JSON: {TOO_DEEP}") from None
    except MemoryError:  # 64 MiB of `[{},{},...]` decodes to about 1.7 GB of objects
        raise ValueError("cannot read its JSON: it needs more memory than there is") from None


def _diagnose_line(line: bytes | object, number: int) -> dict[str, Any]:
    """One --jsonl line: its diagnosis, or {"line": N, "error": "..."}."""
    import json

    if line is _LONG_LINE:
        return {"line": number, "error": f"the line is longer than the {_mib(MAX_DIAGNOSE_LINE_BYTES)} limit of a "
                                         "--jsonl line; it was skipped unread"}
    if line is _CUT_LINE:
        return {"line": number, "error": f"not read to its end: the input passed the "
                                         f"{_mib(MAX_DIAGNOSE_INPUT_BYTES)} limit of `converge diagnose` here"}
    assert isinstance(line, bytes)
    try:
        text = line.decode("utf-8")
    except UnicodeDecodeError as exc:
        return {"line": number, "error": f"not UTF-8 text: {exc}"}
    if not text.strip():
        return {"line": number, "error": "empty line: expected one JSON history"}
    try:
        return _diagnose_text(text)
    except json.JSONDecodeError as exc:
        return {"line": number, "error": f"not valid JSON: {exc.msg} at column {exc.colno}"}
    except ValueError as exc:  # unreadable JSON or an invalid history, worded by `_diagnose_text`
        return {"line": number, "error": str(exc)}


# ---------------------------------------------------------------- study


@cli.group(cls=ConvergeGroup)
def study() -> None:
    """Submit and inspect studies."""


@study.command("create")
@click.option("--spec", "spec_path", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="study spec, YAML or JSON")
@click.option("--check", is_flag=True,
              help="first dry-run the spec's own model and data here (import both factories, build them, one "
                   "training and one validation batch on the CPU, the objective metric logged), as a worker "
                   "does before the first trial; submit only if it passes")
def study_create(spec_path: Path, check: bool) -> None:
    """Submit a study for the workers (it starts as queued).

    A spec naming your own model and data (task.model and task.data as
    "package.module:factory") must import here with --check: run from the directory that
    holds your package, or put it on PYTHONPATH.
    """
    from converge.studies.lifecycle import submit_study

    spec = load_spec_file(spec_path)
    if check:
        _dry_run(spec)
    created = submit_study(get_settings(), spec)
    click.echo(f"study {created.name!r} queued: {created.n_trials} trials")


def _dry_run(spec: Any) -> None:
    """`study create --check`: the same dry run a worker makes (`studies.plugin_check.check_task`)."""
    from converge.studies.plugin_check import PluginCheckError, check_before_running, check_task

    check_before_running(spec, get_settings())  # nothing is imported from a module the settings do not allow
    if not spec.task.is_plugin:
        click.echo("check: a built-in model and dataset; nothing to dry-run")
        return
    try:
        outcome = check_task(spec, get_settings())
    except PluginCheckError as exc:
        raise click.ClickException(f"check failed: {exc}") from None
    logged = ", ".join(f"{k}={v:.4g}" for k, v in outcome["metrics"].items() if isinstance(v, float))
    click.echo(f"check passed in {outcome['seconds']:.1f} s: {spec.task.model} with {spec.task.data} logs {logged}")


@study.command("export-best")
@click.argument("name")
@click.option("--out", "out_dir", required=True, type=click.Path(file_okay=False, path_type=Path),
              help="directory to write the checkpoint and hyperparameters.yaml into (created if missing)")
def study_export_best(name: str, out_dir: Path) -> None:
    """Write the best trial's checkpoint and its hyperparameters as YAML.

    The checkpoint is the one kept in the artifact store (CONVERGE_ARTIFACT_DIR, or the S3
    bucket of CONVERGE_ARTIFACT_S3_BUCKET), under the name it was uploaded with;
    hyperparameters.yaml holds the study, the trial number and value, the five
    hyperparameters and the task (model and data paths, params, seed). In Python,
    `trainers.plugins.load_checkpoint(PATH)` rebuilds the module with its weights.
    Exit status 1 when the study does not exist, has no completed trial, or its best trial
    has no checkpoint kept (a built-in model's study keeps none unless its spec asks).
    """
    from converge.studies.checkpoints import export_best

    done = export_best(get_settings(), name, out_dir)
    click.echo(f"trial {done.trial} of {name!r} ({done.metric} {done.value:.4g}): "
               f"{done.checkpoint} and {done.hyperparameters}")


@study.command("list")
def study_list() -> None:
    """Every study with its state and trial counts."""
    from converge.core.db.engine import get_engine, session_scope
    from converge.service import views
    from converge.studies.storage import storage_for

    settings = get_settings()
    with session_scope(get_engine(settings.database_url)) as session:
        studies = views.list_study_outs(session, storage_for(settings))
    rows = [["name", "state", "trials", "complete", "pruned", "failed", "running", "best"]]
    for s in studies:
        best = f"{s.best.value:.4g} (#{s.best.number})" if s.best and s.best.value is not None else "-"
        rows.append([s.name, s.state, str(s.n_trials), str(s.trials.complete), str(s.trials.pruned),
                     str(s.trials.failed), str(s.trials.running), best])
    click.echo(_table(rows))


@study.command("cancel")
@click.argument("name")
def study_cancel(name: str) -> None:
    """Cancel a queued or running study.

    No new trial of it starts; its running trials stop at their next epoch boundary and are
    failed with the reason. Cancelling a study that has ended is an error (exit status 1).
    """
    from converge.studies.lifecycle import cancel_study

    cancel_study(get_settings(), name)
    click.echo(f"study {name!r} cancelled: running trials stop at their next epoch")


@cli.command("repair")
@click.argument("study_name", metavar="STUDY")
@click.argument("number", type=click.IntRange(min=0))
def repair(study_name: str, number: int) -> None:
    """Queue an unhealthy trial again with its diagnosis' first remedy applied.

    The remedy is kept inside the study's search space; the study gets one more trial to run
    it. A running, healthy or already repaired trial, or one without a usable remedy, is an
    error (exit status 1) that says why.
    """
    from converge.studies.repair import repair_trial

    done = repair_trial(get_settings(), study_name, number)
    remedy = done.remedy
    change = f"{remedy['param']} {remedy['action']}" + (f" ×{remedy['factor']:g}" if remedy.get("factor") else "")
    click.echo(f"trial {number} of {study_name!r}: {change} → {remedy['param']} = {done.params[remedy['param']]:.4g}; "
               f"queued as trial {done.repair_number}")


@study.command("show")
@click.argument("name")
def study_show(name: str) -> None:
    """One study: its state, best trial, every trial, each trial's verdict, then the study's diagnosis.

    The verdict table gives each trial's latest diagnosis (verdict, confidence, first remedy;
    "-" before its first epoch) and ends with a count of trials per verdict. The study's
    diagnosis (as GET /v1/studies/NAME/diagnosis) follows: the verdict counts, the
    hyperparameter regions that explain the unhealthy verdicts, parameter importance, and a
    spec for the next sweep in YAML (`converge study create --spec` takes it).
    """
    _show_study(name, verdicts=True)


def _show_study(name: str, *, verdicts: bool = False) -> None:
    from converge.core.db import repo
    from converge.core.db.engine import get_engine, session_scope
    from converge.service import views
    from converge.studies.storage import storage_for

    settings = get_settings()
    storage = storage_for(settings)
    with session_scope(get_engine(settings.database_url)) as session:
        s = views.get_study_out(session, storage, name)
        trials = views.list_trial_outs(session, name)
        diagnoses = repo.diagnoses_by_trial(session, repo.get_study(session, name).id) if verdicts else {}
    click.echo(f"study {s.name}: {s.state}" + (f" ({s.detail})" if s.detail else ""))
    task = s.spec["task"]
    click.echo(f"  {task['model']} on {task.get('data') or task['dataset']}, "
               f"{s.spec['objective']['direction']} {s.spec['objective']['metric']}, {s.n_trials} trials")
    if s.best is not None:
        click.echo(f"  best: trial {s.best.number} = {s.best.value:.6g} {s.best.params}")
    rows = [["#", "state", *PARAM_NAMES, "value", "epochs run", "error"]]
    for t in trials:
        rows.append([str(t.number), t.state, *(_fmt(t.params.get(k)) for k in PARAM_NAMES),
                     _fmt(t.value), str(t.epochs_recorded), (t.error or "")[:60]])
    click.echo(_table(rows))
    if verdicts:
        click.echo()
        click.echo(_verdict_table(trials, diagnoses))
        click.echo()
        click.echo(_study_diagnosis_text(views.study_diagnosis_out(s.spec, trials)))


def _verdict_table(trials: list[Any], diagnoses: dict[int, Any]) -> str:
    """Per trial: state, value, verdict, confidence, first remedy; then the trials per verdict."""
    rows = [["#", "state", "value", "verdict", "confidence", "remedy"]]
    counts: Counter[str] = Counter()
    for t in trials:
        d = diagnoses.get(t.number)
        if d is None:
            rows.append([str(t.number), t.state, _fmt(t.value), "-", "-", "-"])
            counts["no diagnosis"] += 1
            continue
        remedies = d.diagnosis.get("remedies") or []
        rows.append([str(t.number), t.state, _fmt(t.value), d.verdict, f"{d.confidence:.2f}",
                     _remedy_label(remedies[0]) if remedies else "-"])
        counts[d.verdict] += 1
    total = ", ".join(f"{verdict} {n}" for verdict, n in counts.most_common()) or "no trials"
    return _table(rows) + f"\nverdicts: {total}"


def _study_diagnosis_text(d: Any) -> str:
    """The study's diagnosis for people: counts, regions, importance, then the next spec as YAML."""
    import yaml

    left_out = f"; {d.rerun_attempts} rerun attempts left out" if d.rerun_attempts else ""
    lines = [f"study diagnosis: {d.trials} trials, {d.healthy} healthy, {d.undiagnosed} undiagnosed, "
             f"{d.provisional} still running{left_out}",
             "  verdicts: " + (", ".join(f"{verdict} {n}" for verdict, n in d.verdicts.items()) or "none yet"),
             "  regions: " + ("" if d.regions else "none explains the unhealthy trials")]
    lines += [f"    {region.text}" for region in d.regions]
    imp = d.importance
    if imp.importances is None:
        lines.append(f"  importance: none ({imp.reason})")
    else:
        shares = ", ".join(f"{name} {share:.2f}" for name, share in imp.importances.items())
        lines.append(f"  importance ({imp.evaluator}, {imp.trials_used} trials): {shares}")
    lines.append("  next sweep:")
    lines += [f"    {change}" for change in d.recommendation.changes]
    spec_yaml = yaml.safe_dump(d.recommendation.spec, sort_keys=False, allow_unicode=True)
    lines.append("  recommended spec (`converge study create --spec FILE` takes it as it is):")
    lines += [f"    {line}" for line in spec_yaml.splitlines()]
    return "\n".join(line.rstrip() for line in lines)


def _remedy_label(remedy: dict[str, Any]) -> str:
    """A stored remedy as `Remedy.label()` writes it: "lr × 0.1", "epochs = 18", "gradient_clip on"."""
    param, factor, value = remedy.get("param", "?"), remedy.get("factor"), remedy.get("value")
    if factor is not None:
        return f"{param} × {factor:g}" if isinstance(factor, int | float) else f"{param} × {factor}"
    if value is not None:
        return f"{param} = {value}"
    action = remedy.get("action", "")
    return f"{param} {'on' if action == 'enable' else action}".rstrip()


def _fmt(value: Any) -> str:
    if value is None:
        return "-"
    return f"{value:.4g}" if isinstance(value, float) else str(value)


def _table(rows: list[list[str]]) -> str:
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    return "\n".join("  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows)


@cli.command("report")
@click.argument("study_name", metavar="STUDY")
@click.option("--out", "out", required=True, type=click.Path(dir_okay=False, writable=True, path_type=Path),
              help="the HTML file to write")
@click.option("--max-trials", default=200, show_default=True, type=click.IntRange(0, 100_000),
              help="unhealthy trials with a figure of their own (the first, by number)")
def report(study_name: str, out: Path, max_trials: int) -> None:
    """Write one self-contained HTML report of a study (plotly.js inlined: it opens offline).

    It holds the study summary (state, trials, best trial, verdicts, the regions that explain the
    unhealthy ones, importance, the next sweep's changes), the study's figures (objective history,
    parallel coordinates, learning rate against objective, verdict counts, loss curves, all
    coloured by verdict), and each unhealthy trial's diagnosis and figure.
    """
    from converge.core.db.engine import get_engine, session_scope
    from converge.service.report import build_report
    from converge.studies.storage import storage_for

    settings = get_settings()
    with session_scope(get_engine(settings.database_url)) as session:
        page, held = build_report(session, storage_for(settings), study_name, max_trials=max_trials)
    out.write_text(page, encoding="utf-8")
    left_out = f", {held['left_out']} more left out" if held["left_out"] else ""
    click.echo(f"wrote {out} ({len(page) / 1e6:.1f} MB): study {study_name!r}, "
               f"{len(held['unhealthy'])} unhealthy trial(s){left_out}")


# ---------------------------------------------------------------- schedules


@cli.command("scheduler")
def scheduler_command() -> None:
    """Run the scheduler alone (`converge serve` runs it too): fire due schedules, start queued runs,
    report on ended ones and post webhooks, every CONVERGE_SCHEDULER_POLL_S (5 s). Safe beside other
    schedulers on one database: each fire time is launched once. Stops on Ctrl-C or SIGTERM."""
    from converge.core.db.migrate import check_schema
    from converge.service.scheduler import Scheduler

    _setup_logging()
    settings = get_settings()
    check_schema(settings.database_url)
    scheduler = Scheduler(settings)
    signal.signal(signal.SIGTERM, lambda *_: scheduler.request_stop())
    try:
        scheduler.run_forever()
    except KeyboardInterrupt:
        pass
    finally:
        scheduler.stop()


@cli.group(cls=ConvergeGroup)
def schedule() -> None:
    """Scheduled (cron) sweeps: each fire time submits a study from a template."""


@schedule.command("create")
@click.option("--cron", "cron", required=True, help="5-field cron expression, e.g. '30 2 * * *'")
@click.option("--timezone", "zone", default="UTC", show_default=True,
              help="IANA time zone of the cron expression and of the runs' names")
@click.option("--spec", "spec_path", required=True, type=click.Path(dir_okay=False, path_type=Path),
              help="study spec (YAML or JSON) whose name is each run's prefix: runs are NAME-YYYYMMDD-HHMM")
@click.option("--disabled", is_flag=True, help="create it disabled")
@click.option("--misfire-grace", "misfire_grace_s", default=3600, show_default=True, type=int,
              help="seconds a missed fire time may be late and still run (once) after downtime")
@click.option("--overlap", type=click.Choice(["skip", "queue"]), default="skip", show_default=True,
              help="a fire while the previous run is going: record it as skipped, or queue it")
@click.option("--warm-start-top-k", default=0, show_default=True, type=int,
              help="enqueue the previous run's best k parameter sets first")
@click.option("--warm-start-search-space", is_flag=True,
              help="start from the previous run's recommended search space")
@click.option("--regression-threshold", default=0.05, show_default=True, type=float,
              help="flag a run whose best worsens by more than this fraction of the previous best")
@click.option("--webhook", "webhook_url", default=None,
              help="URL that gets a JSON POST per finished, regressed or failed run; a public address, unless "
                   "CONVERGE_WEBHOOK_ALLOW lists its host or a network holding it")
def schedule_create(cron: str, zone: str, spec_path: Path, disabled: bool, misfire_grace_s: int, overlap: str,
                    warm_start_top_k: int, warm_start_search_space: bool, regression_threshold: float,
                    webhook_url: str | None) -> None:
    """Create a schedule; prints its id and next fire time. Bad input: exit status 2."""
    from pydantic import ValidationError

    from converge.core.db.engine import get_engine, session_scope
    from converge.service import outbound, schedules
    from converge.studies.spec import describe_errors

    template = load_spec_file(spec_path).model_dump(mode="json")
    allow = outbound.Allow.from_setting(get_settings().webhook_allow)
    try:
        data = schedules.ScheduleIn(cron=cron, timezone=zone, template=template, enabled=not disabled,
                                    misfire_grace_s=misfire_grace_s, overlap=overlap,
                                    warm_start_top_k=warm_start_top_k,
                                    warm_start_search_space=warm_start_search_space,
                                    regression_threshold=regression_threshold, webhook_url=webhook_url)
    except ValidationError as exc:
        problems = describe_errors(exc.errors())
        if not any(p.startswith("webhook_url:") for p in problems):  # every problem at once, the address's too
            problems += schedules.webhook_problems(webhook_url, allow)
        raise SpecError(problems, "schedule") from None
    with session_scope(get_engine(get_settings().database_url)) as session:
        out = schedules.create_schedule(session, data, allow=allow)
    nxt = _when(out.next_fire_time) if out.next_fire_time else "- (disabled)"
    click.echo(f"schedule {out.id} created: runs {template['name']}-YYYYMMDD-HHMM, next fire time {nxt}")


@schedule.command("list")
def schedule_list() -> None:
    """Every schedule: id, prefix, cron, zone, enabled, overlap, next fire time, webhook."""
    from converge.core.db.engine import get_engine, session_scope
    from converge.service import schedules

    with session_scope(get_engine(get_settings().database_url)) as session:
        found = schedules.list_schedules(session)
    rows = [["id", "prefix", "cron", "timezone", "enabled", "overlap", "next fire", "webhook"]]
    for s in found:
        rows.append([str(s.id), s.template["name"], s.cron, s.timezone, "yes" if s.enabled else "no", s.overlap,
                     _when(s.next_fire_time), s.webhook_url or "-"])
    click.echo(_table(rows) if found else "no schedules (`converge schedule create` makes one)")


@schedule.command("delete")
@click.argument("schedule_id", metavar="ID", type=int)
def schedule_delete(schedule_id: int) -> None:
    """Delete a schedule and its run records (the studies stay). An unknown id: exit status 1."""
    from converge.core.db.engine import get_engine, session_scope
    from converge.service import schedules

    with session_scope(get_engine(get_settings().database_url)) as session:
        schedules.delete_schedule(session, schedule_id)
    click.echo(f"schedule {schedule_id} deleted")


@schedule.command("run-now")
@click.argument("schedule_id", metavar="ID", type=int)
def schedule_run_now(schedule_id: int) -> None:
    """Start a run of the schedule now (warm start and overlap policy as for a cron fire). With overlap
    `skip` while a run is going: exit status 1; a run that could not start: exit status 1."""
    from converge.core.db.engine import get_engine, session_scope
    from converge.service import schedules
    from converge.service.scheduler import Scheduler

    settings = get_settings()
    scheduler = Scheduler(settings)
    try:
        run_id = scheduler.run_now(schedule_id)
    finally:
        scheduler.notifier.close(wait=True)
    with session_scope(get_engine(settings.database_url)) as session:
        run = schedules.get_run(session, run_id)
    what = f"study {run.study_name!r} queued" if run.study_name else run.state
    click.echo(f"run {run.id} of schedule {schedule_id}: {what}{f' ({run.reason})' if run.reason else ''}")
    if run.state == "failed":
        click.get_current_context().exit(1)


@schedule.command("runs")
@click.argument("schedule_id", metavar="ID", type=int)
@click.option("--limit", default=20, show_default=True, type=click.IntRange(1, 1000), help="runs to show")
def schedule_runs(schedule_id: int, limit: int) -> None:
    """The schedule's latest runs: fire time, state, study, best value and its change, regression."""
    from converge.core.db.engine import get_engine, session_scope
    from converge.service import schedules

    with session_scope(get_engine(get_settings().database_url)) as session:
        found = schedules.list_runs(session, schedule_id, limit)
    rows = [["id", "fire time", "state", "study", "best", "delta", "regression", "reason"]]
    for r in found:
        report = r.report or {}
        rows.append([str(r.id), _when(r.fire_time), r.state, r.study_name or "-", _fmt(report.get("best_value")),
                     _fmt(report.get("best_delta")), {True: "yes", False: "no"}.get(r.regression, "-"),
                     r.reason or ""])
    click.echo(_table(rows) if found else "no runs yet")


def main() -> None:
    cli(prog_name="converge")


if __name__ == "__main__":
    main()
