"""`ember`: run the pipeline, look into the store, launch the demo."""

from __future__ import annotations

import json
import logging
import os
import sys
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from enum import Enum
from importlib import metadata
from pathlib import Path
from typing import TYPE_CHECKING, NoReturn

import typer
from rich.console import Console
from rich.table import Table

import ember.flows  # noqa: F401  (offline defaults, before Prefect or Gradio load)
from ember.flows.config import ConfigError, load_config
from ember.storage.objects import open_store
from ember.storage.store import Store, StoreError, default_root
from ember.tasks.stages import STAGE_NAMES

app = typer.Typer(add_completion=False, no_args_is_help=True, help=__doc__)
console = Console()
err_console = Console(stderr=True)

# The stage names as a choice: `--help` lists them and a typo is refused before anything runs.
if TYPE_CHECKING:  # a type checker cannot make members from a list; their values are the names

    class StageChoice(str, Enum):
        _value_: str

else:
    StageChoice = Enum("StageChoice", {name: name for name in STAGE_NAMES}, type=str)
STAGES_HELP = "stages, in order: " + ", ".join(STAGE_NAMES)


def _print_version(value: bool) -> None:
    if value:
        console.print(f"ember {metadata.version('ember-llm')}")
        raise typer.Exit()


@app.callback()
def main(
    version: bool = typer.Option(
        False, "--version", callback=_print_version, is_eager=True, help="print Ember's version and exit"
    ),
) -> None:
    """`ember`: run the pipeline, look into the store, launch the demo."""


StoreOption = typer.Option(
    None,
    "--store",
    metavar="FOLDER|URL",
    help="store folder or URL, e.g. s3://bucket/ember (default: $EMBER_HOME, else .ember/)",
)


def _store(root: str | None) -> Store:
    return open_store(root or default_root())


def _fail(message: str, code: int = 2) -> NoReturn:
    err_console.print(f"[bold red]error:[/] {message}", highlight=False)
    raise typer.Exit(code)


def _size(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1024 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1024
    return str(n)


@app.command()
def run(
    config_path: Path = typer.Argument(..., metavar="CONFIG", help="pipeline YAML, e.g. configs/sample.yaml"),
    force: list[StageChoice] = typer.Option(
        [], "--force", metavar="STAGE", help=f"rerun this stage even if cached (repeatable); {STAGES_HELP}"
    ),
    from_stage: StageChoice | None = typer.Option(
        None, "--from", metavar="STAGE", help=f"rerun this stage and every stage after it; {STAGES_HELP}"
    ),
    retrain: bool = typer.Option(
        False,
        "--retrain",
        help="run as the retrain deployment does: warm start from the published release, publish only through the gate",
    ),
    force_publish: bool = typer.Option(
        False, "--force-publish", help="publish even if the model is not better than the published one"
    ),
    store: str | None = StoreOption,
) -> None:
    """Run every stage of the pipeline; unchanged stages are cache hits."""
    from ember.tasks.download import SourceError, preflight

    try:
        config = load_config(config_path)
        preflight(config.download)  # a missing or empty source fails here, before Prefect starts
    except (ConfigError, SourceError) as err:
        _fail(str(err))
    if retrain and force_publish:
        _fail("--retrain publishes only through the gate; leave out --force-publish")

    from ember.flows.pipeline import Purpose, build_llm, retrain_config, run_name

    purpose: Purpose = "retrain" if retrain else "build"
    if retrain:
        config = retrain_config(config)
    if force_publish:
        config = config.model_copy(update={"publish": config.publish.model_copy(update={"force": True})})
    name = run_name(purpose, config)
    console.print(f"[bold]{name}[/]: {len(STAGE_NAMES)} stages, store {config.store_root(store)}", highlight=False)
    started = time.monotonic()
    try:
        with live_progress():
            summary = build_llm(
                config,
                force=[stage.value for stage in force] or None,
                from_stage=from_stage.value if from_stage else None,
                store_root=str(store) if store else None,
                purpose=purpose,
            )
    except Exception as err:  # the flow's log has the traceback; the terminal gets the reason
        _fail(f"{type(err).__name__}: {err}", code=1)

    table = Table(title=f"{name} ({time.monotonic() - started:.0f}s)")
    for column in ("stage", "result", "seconds", "artifact"):
        table.add_column(column)
    for row in summary["stages"]:
        result = "[green]cache hit[/]" if row["cached"] else "[yellow]ran[/]"
        table.add_row(row["stage"], result, f"{row['seconds']:.1f}", row["ref"][: len(row["stage"]) + 13])
    console.print(table)
    store_flag = f" --store {summary['store']}" if store else ""
    # `make run` calls .venv/bin/ember, which is not on PATH: print the command as it was called.
    launcher = sys.argv[0] if Path(sys.argv[0]).name == "ember" else "ember"
    if summary["release"]:
        console.print(f"Release: [bold]{summary['release']}[/]")
    else:
        console.print(f"[yellow]{summary['not_published']}[/]", highlight=False)
    console.print(f"Launch the demo: [bold]{launcher} demo{store_flag}[/]  (or `make demo`)")


@app.command("config")
def show_config(config_path: Path = typer.Argument(..., metavar="CONFIG", help="pipeline YAML")) -> None:
    """Print a config as the pipeline reads it (validated, defaults filled in, paths absolute) as
    JSON: the value of the `ember_config` Prefect variable that prefect.yaml's deployments take."""
    try:
        config = load_config(config_path)
    except ConfigError as err:
        _fail(str(err))
    print(config.pinned().model_dump_json())


@app.command()
def watch(
    config_path: Path = typer.Argument(..., metavar="CONFIG", help="pipeline YAML"),
    every: float | None = typer.Option(
        None, min=0.1, help="seconds between checks (default: the config's schedule.watch_seconds)"
    ),
    store: str | None = StoreOption,
) -> None:
    """Watch a config's sources and emit `ember.corpus.changed` when they change, until Ctrl-C
    (what `make serve` does in a thread; for workers deployed from prefect.yaml)."""
    from ember.flows.watch import watch_sources

    try:
        config = load_config(config_path)
    except ConfigError as err:
        _fail(str(err))
    seconds = every or config.schedule.watch_seconds
    if not seconds:
        _fail(f"{config_path}: schedule.watch_seconds is null; pass --every SECONDS")
    # Its lines go to this terminal: no flow run here for Prefect's handlers to follow.
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", datefmt="%H:%M:%S")
    stop = threading.Event()
    try:
        watch_sources(config, seconds, stop, store)
    except KeyboardInterrupt:
        stop.set()


@contextmanager
def live_progress() -> Iterator[None]:
    """A live bar with an ETA for each long step of a stage (what its `ctx.report.progress` says),
    drawn on the console Prefect logs to, so log lines scroll above the bars; the progress log
    lines themselves stay out of the terminal (they still reach the run log)."""
    from prefect.logging import configuration
    from prefect.logging.handlers import PrefectConsoleHandler
    from rich.default_styles import DEFAULT_STYLES
    from rich.progress import (
        BarColumn,
        MofNCompleteColumn,
        Progress,
        TaskID,
        TaskProgressColumn,
        TextColumn,
        TimeElapsedColumn,
        TimeRemainingColumn,
    )
    from rich.theme import Theme

    from ember.flows.prefect_stage import PROGRESS_LISTENERS

    # Prefect configures its logging lazily; its console handlers exist once it has.
    if not configuration.PROCESS_LOGGING_CONFIG:
        configuration.setup_logging()
    loggers = [logging.getLogger()] + [
        logger for logger in logging.root.manager.loggerDict.values() if isinstance(logger, logging.Logger)
    ]
    handlers = list(
        {id(h): h for logger in loggers for h in logger.handlers if isinstance(h, PrefectConsoleHandler)}.values()
    )
    shared = handlers[0].console if handlers else err_console
    for handler in handlers:
        handler.console = shared  # one console: a log line printed while the bars are live goes above them
    # Prefect's console has a theme of its own, without the bars' styles: lend it rich's.
    shared.push_theme(
        Theme({name: style for name, style in DEFAULT_STYLES.items() if name.startswith(("bar.", "progress."))})
    )

    def not_progress(record: logging.LogRecord) -> bool:
        return not getattr(record, "ember_progress", False)

    bars = Progress(
        TextColumn("{task.description:<34}"),
        BarColumn(),
        TaskProgressColumn(),
        MofNCompleteColumn(),
        TimeElapsedColumn(),
        TextColumn("ETA"),
        TimeRemainingColumn(),
        console=shared,
    )
    tasks: dict[tuple[str, str], TaskID] = {}
    lock = threading.Lock()

    def listen(stage: str, what: str, done: float, total: float) -> None:
        with lock:
            if (stage, what) not in tasks:
                tasks[stage, what] = bars.add_task(what, total=total or None)
            bars.update(tasks[stage, what], completed=done, total=total or None)

    for handler in handlers:
        handler.addFilter(not_progress)
    PROGRESS_LISTENERS.append(listen)
    try:
        with bars:
            yield
    finally:
        PROGRESS_LISTENERS.remove(listen)
        shared.pop_theme()
        for handler in handlers:
            handler.removeFilter(not_progress)


@app.command("ls")
def list_artifacts(
    stage: str | None = typer.Option(None, help="only this stage"), store: str | None = StoreOption
) -> None:
    """List complete artifacts in the store, oldest first."""
    s = _store(store)
    table = Table(title=f"artifacts in {s.location}")
    for column in ("ref", "created", "size", "seconds"):
        table.add_column(column)
    for artifact in s.ls(stage):
        created = time.strftime("%Y-%m-%d %H:%M", time.localtime(artifact.manifest.get("created", 0)))
        table.add_row(
            artifact.ref[: len(artifact.stage) + 13],
            created,
            _size(artifact.size),
            f"{artifact.manifest.get('seconds', 0):.1f}",
        )
    console.print(table)


@app.command()
def show(
    ref: str = typer.Argument(..., help="a ref or key prefix, as `ember ls` prints"),
    as_json: bool = typer.Option(False, "--json", help="the whole manifest as JSON, report included"),
    store: str | None = StoreOption,
) -> None:
    """Print an artifact's manifest (inputs, params, metrics, files), then the report its stage gave."""
    from rich.markdown import Markdown

    try:
        artifact = _store(store).find(ref)
    except StoreError as err:
        _fail(str(err))
    manifest = {"path": str(artifact.path), **artifact.manifest}
    if as_json:
        console.print_json(json.dumps(manifest, default=str))
        return
    report = manifest.pop("report", [])
    console.print_json(json.dumps(manifest, default=str))
    for section in report:
        text = section["markdown"].strip()
        titled = section["title"] and not text.startswith("#")
        console.print(Markdown(f"### {section['title']}\n\n{text}" if titled else text))


@app.command("audit")
def audit_document(
    doc_id: str = typer.Argument(..., help="a document id (`source/file:record`, with or without `#chunkN`)"),
    as_json: bool = typer.Option(False, "--json", help="print the report as JSON"),
    store: str | None = StoreOption,
) -> None:
    """Tell what happened to a document: download, normalize, filter (rule), dedup, and which runs."""
    from ember.flows.audit import audit_document as audit
    from ember.flows.audit import format_audit

    report = audit(_store(store), doc_id)
    if as_json:
        console.print_json(json.dumps(report, default=str))
    else:
        console.print(format_audit(report), highlight=False, markup=False)
    if not report["found"]:
        raise typer.Exit(1)


@app.command()
def verify(store: str | None = StoreOption) -> None:
    """Check every artifact's files against the sizes and checksums in its manifest."""
    s = _store(store)
    problems = s.verify()
    for line in problems:
        console.print(f"[red]✗[/] {line}")
    if problems:
        raise typer.Exit(1)
    console.print(f"[green]✓[/] {len(s.ls())} artifacts verified in {s.location}")


@app.command()
def gc(
    dry_run: bool = typer.Option(False, "--dry-run", help="only list what would be deleted"),
    store: str | None = StoreOption,
) -> None:
    """Delete artifacts that no recent run or release uses, and leftovers of crashed runs."""
    removed = _store(store).gc(dry_run=dry_run)
    verb = "would delete" if dry_run else "deleted"
    for line in removed:
        console.print(f"{verb} {line}")
    console.print(f"{len(removed)} {'items' if len(removed) != 1 else 'item'} {verb}")


@app.command()
def releases(store: str | None = StoreOption) -> None:
    """List published releases with their eval figures; the one `latest` points to is marked."""
    from ember.storage.releases import list_releases

    s = _store(store)
    rows = list_releases(s.sync_releases())
    if not rows:
        console.print(f"no releases in {s.releases_dir}; `ember run CONFIG` publishes one")
        return
    table = Table(title=f"releases in {s.releases_dir}")
    for column in ("version", "created (UTC)", "bits/byte", "val loss", "int8 bpb", "tokens", "size", "latest"):
        table.add_column(
            column, no_wrap=True, justify="left" if column in ("version", "created (UTC)", "latest") else "right"
        )

    def fig(value: float | None, digits: int = 4) -> str:
        return "n/a" if value is None else f"{value:.{digits}f}"

    for row in rows:
        table.add_row(
            row["version"],
            row["created"].replace("T", " ")[:16],
            fig(row["bpb"]),
            fig(row["val_loss"]),
            fig(row["int8_bpb"]),
            f"{row['tokens'] or 0:,}",
            _size(row["size_bytes"]),
            "[bold green]← latest[/]" if row["latest"] else "",
        )
    console.print(table)


@app.command()
def publish(
    version: str | None = typer.Argument(None, metavar="[VERSION]", help="release to point latest at"),
    rollback: bool = typer.Option(
        False, "--rollback", help="point latest back: to VERSION, default the one before the current latest"
    ),
    store: str | None = StoreOption,
) -> None:
    """Point `latest` at another release (`--rollback [VERSION]`); `ember run` publishes new ones."""
    from ember.storage.releases import rollback as point_back

    if not rollback and version is None:
        _fail(
            "nothing to do: `ember publish --rollback [VERSION]` points latest back; "
            "`ember run CONFIG` publishes a new release"
        )
    s = _store(store)
    try:
        with s.releases_lock():
            was, now = point_back(s.sync_releases(), version)
            s.push_releases()
    except ValueError as err:
        _fail(str(err))
    console.print(f"latest: {was or '(none)'} → [bold]{now}[/]" + ("  (unchanged)" if was == now else ""))


@app.command()
def demo(
    release: str = typer.Option("latest", help="release version to serve"),
    host: str = typer.Option("127.0.0.1", help="address to bind; 0.0.0.0 exposes it to your network"),
    port: int = typer.Option(7860),
    auth: str | None = typer.Option(
        None, "--auth", metavar="USER:PASSWORD", help="require this login (default: $EMBER_DEMO_AUTH, else none)"
    ),
    concurrency: int = typer.Option(1, min=1, help="generations running at once; others wait in the queue"),
    share: bool = typer.Option(False, "--share", help="ask Gradio for a public link (off by default)"),
    store: str | None = StoreOption,
) -> None:
    """Launch the Gradio demo on a published release."""
    from ember.deployments.app import AUTH_ENV, launch, parse_auth

    try:
        login = parse_auth(auth if auth is not None else os.environ.get(AUTH_ENV))
    except ValueError as err:
        _fail(str(err))
    if host not in ("127.0.0.1", "localhost", "::1") and login is None:
        err_console.print(f"[yellow]warning:[/] serving on {host} without a login; pass --auth USER:PASSWORD")
    s = _store(store)
    releases_dir = s.sync_releases()
    s.follow_releases()
    launch(releases_dir, release=release, host=host, port=port, share=share, auth=login, concurrency=concurrency)


if __name__ == "__main__":
    app()
