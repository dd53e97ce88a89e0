"""The ``autoglm`` command line: the process roles (worker, ingest, serve, learn), ``up``, and the
client commands (search, models, promote, ...). Every role option is declared once, in a table below."""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import os
import signal
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.parse
import urllib.request
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable

from autoglm.settings import DEMO_LEARNING_RATE, DEMO_TRAIN_SECONDS, ApiLimits, Settings

DEFAULT_API = "http://127.0.0.1:8000"


@dataclass(frozen=True)
class Option:
    """One option of the process roles, declared once: its flags, the Settings field it sets
    (or None), how the parsed value becomes that field's value, and argparse's keywords."""

    flags: tuple[str, ...]
    field: str | None
    kwargs: dict
    convert: Callable[[Any], Any] = lambda value: value

    @property
    def dest(self) -> str:
        return self.flags[0].removeprefix("--").replace("-", "_")


def _path(value: str | None) -> Path | None:
    return Path(value) if value else None


def _negated(value: bool) -> bool:
    return not value


_D = Settings()
_L = _D.api_limits

# Options every role takes: where the broker, the index, MLflow and the state are.
COMMON = (
    Option(("--data-dir",), "data_dir", dict(default=str(_D.data_dir), help="state directory (default %(default)s)"),
           Path),
    Option(("--index",), "index_backend", dict(choices=("embedded", "elasticsearch"), default=_D.index_backend,
                                                help="index backend (default %(default)s)")),
    Option(("--es-url",), "es_url", dict(default=os.environ.get("AUTOGLM_ES_URL"),
                                         help="Elasticsearch URL for --index elasticsearch (default $AUTOGLM_ES_URL)")),
    Option(("--es-index",), "es_index", dict(default=_D.es_index, help="Elasticsearch index alias")),
    Option(("--es-refresh",), "es_refresh", dict(choices=("wait_for", "true", "false"), default=_D.es_refresh,
                                                 help="per commit: wait_for (searchable when it returns), true, "
                                                      "or false (the index's refresh_interval decides; "
                                                      "default %(default)s)")),
    Option(("--group-id",), "group_id", dict(default=_D.group_id,
                                             help="consumer group of the ingest workers (one per index; "
                                                  "default %(default)s)")),
    Option(("--learn-group-id",), "learn_group_id", dict(default=_D.learn_group_id,
                                                         help="consumer group of the learners (default %(default)s)")),
    Option(("--dead-letter-max-bytes",), "dead_letter_max_bytes",
           dict(type=int, default=_D.dead_letter_max_bytes,
                help="a larger dead letter is sent as a reference to its record (default %(default)s)")),
    Option(("--feedback-retention",), "feedback_retention_s",
           dict(type=float, default=_D.feedback_retention_s,
                help="seconds after its ts that feedback is still accepted (default %(default)s)")),
    Option(("--query-runtime",), "query_runtime", dict(choices=("onnx", "torch"), default=_D.query_runtime,
                                                       help="runtime that encodes queries while serving "
                                                            "(default %(default)s)")),
    Option(("--challenger-share",), "challenger_share",
           dict(type=float, default=_D.challenger_share,
                help="share of sessions the challenger version answers (default %(default)s)")),
    Option(("--alias-poll",), "alias_poll_s", dict(type=float, default=_D.alias_poll_s,
                                                   help="seconds between reads of the MLflow aliases "
                                                        "(default %(default)s)")),
)
# Where a role's HTTP server listens (the search API, or /healthz and /metrics), and its limits.
HTTP = (
    Option(("--host",), "api_host", dict(default=_D.api_host,
                                          help="address to listen on; 0.0.0.0 in a container (default %(default)s)")),
    Option(("--port", "--api-port"), "api_port", dict(type=int, default=_D.api_port,
                                                      help="port to listen on (default %(default)s)")),
    Option(("--advertise-url",), "advertise_url",
           dict(help="URL others (MLflow's webhooks) reach this process at (default http://HOST:PORT, "
                     "this machine's hostname for 0.0.0.0)")),
    Option(("--api-max-body",), None, dict(type=int, default=_L.max_body_bytes,
                                           help="largest request body in bytes; 413 beyond (default %(default)s)")),
    Option(("--api-max-webhook-body",), None,
           dict(type=int, default=_L.max_webhook_body_bytes,
                help="largest /hooks/mlflow body in bytes, refused before its signature is checked "
                     "(default %(default)s)")),
    Option(("--api-max-feedback-items",), None, dict(type=int, default=_L.max_feedback_items,
                                                     help="most events in one POST /feedback; 413 beyond "
                                                          "(default %(default)s)")),
    Option(("--api-max-query-chars",), None, dict(type=int, default=_L.max_query_chars,
                                                  help="longest /search q in characters; 422 beyond "
                                                       "(default %(default)s)")),
    Option(("--api-header-timeout",), None, dict(type=float, default=_L.header_timeout_s,
                                                 help="seconds a client has to send its request headers; 408 after "
                                                      "(default %(default)s)")),
    Option(("--api-body-timeout",), None, dict(type=float, default=_L.body_timeout_s,
                                               help="seconds a client has to send its request body; 408 after "
                                                    "(default %(default)s)")),
    Option(("--api-max-concurrency",), None,
           dict(type=int, default=_L.max_concurrent_requests,
                help="requests in flight beyond which the API answers 503 with Retry-After (default %(default)s)")),
)
# The search API's limits (search/limits.py): option -> ApiLimits field.
API_LIMIT_FIELDS = {"api_max_body": "max_body_bytes", "api_max_webhook_body": "max_webhook_body_bytes",
                    "api_max_feedback_items": "max_feedback_items", "api_max_query_chars": "max_query_chars",
                    "api_header_timeout": "header_timeout_s", "api_body_timeout": "body_timeout_s",
                    "api_max_concurrency": "max_concurrent_requests"}
INGEST = (
    Option(("--cdc-topics",), "cdc_topics", dict(default=_D.cdc_topics,
                                                 help="regular expression of the Debezium topics to index "
                                                      "(default %(default)s)")),
    Option(("--mapping",), "mapping_file", dict(help="TOML file mapping table rows to documents"), _path),
)
SERVE = (
    Option(("--no-webhooks",), "webhooks", dict(action="store_true",
                                                help="follow the aliases by polling only (no MLflow webhook)"),
           _negated),
)
LEARN = (
    Option(("--window-size",), "window_size", dict(type=int, default=_D.window_size,
                                                   help="train when this many new examples exist "
                                                        "(default %(default)s)")),
    Option(("--window-minutes",), "window_minutes",
           dict(type=float, default=_D.window_minutes,
                help="... or after this many minutes with a minimum of examples (default %(default)s)")),
    Option(("--window-min",), "window_min", dict(type=int, default=_D.window_min,
                                                 help="... the minimum of examples for a window closed on time "
                                                      "(default %(default)s)")),
    Option(("--feedback-max-wait",), "feedback_max_wait_s",
           dict(type=float, default=_D.feedback_max_wait_s,
                help="seconds feedback waits for its impression (default %(default)s)")),
    Option(("--learning-rate",), "learning_rate",
           dict(type=float, default=_D.learning_rate,
                help="AdamW learning rate of each window's fine-tuning (default %(default)s)")),
    Option(("--train-seconds",), "train_max_seconds", dict(type=float, default=_D.train_max_seconds,
                                                           help="time limit of one fine-tuning run "
                                                                "(default %(default)s)")),
    Option(("--propensities",), "propensities",
           dict(choices=("prior", "log"), default=_D.propensities,
                help="click propensities per rank: the prior 1/rank^0.8, or estimated from the click log, "
                     "which confounds them with relevance (default %(default)s)")),
    Option(("--gate-dataset",), "gate_dataset",
           dict(help="BEIR folder whose train dev split gates every candidate model"), _path),
    Option(("--promote-champion",), "promote_champion",
           dict(action="store_true", help="let the trainer move the champion alias itself (demo; normally a "
                                          "person does)")),
    Option(("--online-settle",), "online_settle_s",
           dict(type=float, default=_D.online_settle_s,
                help="seconds after which a search counts in the online metrics (default %(default)s)")),
    Option(("--no-auto-rollback",), "auto_rollback",
           dict(action="store_true", help="never move an alias automatically (the online metrics are still kept)"),
           _negated),
    Option(("--champion-watch",), "champion_watch",
           dict(type=int, default=_D.champion_watch,
                help="impressions of a newly promoted champion during which it goes back to its predecessor "
                     "if users like it less (0: no watch; default %(default)s)")),
)
ROLE_OPTIONS = {"worker": COMMON + HTTP + INGEST + SERVE + LEARN, "ingest": COMMON + HTTP + INGEST,
                "serve": COMMON + HTTP + SERVE, "learn": COMMON + HTTP + LEARN}


def _add_options(parser: argparse.ArgumentParser, options: tuple[Option, ...]) -> None:
    for option in options:
        parser.add_argument(*option.flags, dest=option.dest, **option.kwargs)


def _settings(args: argparse.Namespace, options: tuple[Option, ...]) -> Settings:
    values = {option.field: option.convert(getattr(args, option.dest)) for option in options if option.field}
    limits = ApiLimits(**{field: getattr(args, dest) for dest, field in API_LIMIT_FIELDS.items()})
    return Settings(broker=args.broker, mlflow_uri=args.mlflow_uri, api_limits=limits, **values)


def _forwarded(args: argparse.Namespace, options: tuple[Option, ...]) -> list[str]:
    """The command-line arguments that give another process these options' values."""
    argv = []
    for option in options:
        value = getattr(args, option.dest)
        if option.kwargs.get("action") == "store_true":
            argv += [option.flags[0]] if value else []
        elif value is not None:
            argv += [option.flags[0], str(value)]
    return argv


def _run_role(run: Callable[[Settings], None], role: str) -> Callable[[argparse.Namespace], int]:
    def command(args: argparse.Namespace) -> int:
        from roles.parts import DataDirInUse

        try:
            run(_settings(args, ROLE_OPTIONS[role]))
        except (DataDirInUse, ValueError) as exc:
            print(f"autoglm {role}: {exc}", file=sys.stderr)
            return 2
        return 0
    return command


def _role_runner(role: str) -> Callable[[Settings], None]:
    """The role's composition root, imported only when that role runs."""
    def run(settings: Settings) -> None:
        module = importlib.import_module(f"roles.{role}")
        getattr(module, f"run_{role}")(settings)
    return run


def cmd_broker(args: argparse.Namespace) -> int:
    from autoglm.broker import EmbeddedBroker
    from autoglm.topics import PLATFORM_TOPICS, ensure_topics

    broker = EmbeddedBroker(port=args.port).start()
    ensure_topics(broker.address, PLATFORM_TOPICS)
    print(f"broker: {broker.address}", flush=True)
    _stop_on_signals(broker.stop)
    return broker.wait()


def cmd_up(args: argparse.Namespace) -> int:
    """Start the broker (unless --broker), then the worker; print the API address once healthy."""
    from autoglm.broker import EmbeddedBroker
    from autoglm.process import die_with_parent
    from autoglm.topics import PLATFORM_TOPICS, ensure_topics
    from roles.parts import DataDirInUse, lock_data_dir

    try:
        lock_data_dir(Settings(data_dir=Path(args.data_dir))).close()
    except DataDirInUse as exc:
        print(f"autoglm: {exc}", file=sys.stderr)
        return 2

    broker = None
    address = args.broker
    if address is None:
        Path(args.data_dir).mkdir(parents=True, exist_ok=True)
        broker = EmbeddedBroker(log_file=Path(args.data_dir) / "broker.log").start()
        address = broker.address
        print(f"broker: {address} (embedded, in memory)", flush=True)
    ensure_topics(address, PLATFORM_TOPICS)

    mlflow, mlflow_uri = None, args.mlflow_uri
    if mlflow_uri is None:
        from registry.server import MlflowServer

        mlflow = MlflowServer(Path(args.data_dir)).start()
        mlflow_uri = mlflow.url
        print(f"mlflow: {mlflow_uri}", flush=True)

    command = [sys.executable, "-m", "roles.cli", "worker", "--broker", address, "--mlflow-uri", mlflow_uri,
               *_forwarded(args, ROLE_OPTIONS["worker"])]
    worker = subprocess.Popen(command, preexec_fn=die_with_parent)
    stopping = threading.Event()

    def stop() -> None:
        """Worker and MLflow stop in parallel (each may take a few seconds), then the broker."""
        stopping.set()
        stopping_mlflow = threading.Thread(target=mlflow.stop) if mlflow else None
        if stopping_mlflow:
            stopping_mlflow.start()
        if worker.poll() is None:
            worker.send_signal(signal.SIGTERM)
            try:
                worker.wait(timeout=8)
            except subprocess.TimeoutExpired:
                worker.kill()
                worker.wait()
        if stopping_mlflow:
            stopping_mlflow.join()
        if broker:
            broker.stop()

    _stop_on_signals(stop)
    api = f"http://{'127.0.0.1' if args.host in ('0.0.0.0', '::') else args.host}:{args.port}"
    deadline = time.monotonic() + args.ready_timeout
    while worker.poll() is None and not stopping.is_set():
        if _healthy(api):
            print(f"api: {api}", flush=True)
            break
        if time.monotonic() > deadline:
            print(f"autoglm: not healthy after {args.ready_timeout:.0f} s; see {api}/healthz", file=sys.stderr)
            stop()
            return 1
        time.sleep(0.2)
    code = worker.wait()
    stop()
    return 0 if stopping.is_set() else code


class ApiError(RuntimeError):
    """The API (or the registry behind it) could not do what a command asked; main() prints it."""


def _get_json(api: str, path: str) -> dict:
    try:
        with urllib.request.urlopen(f"{api}{path}", timeout=30) as response:
            return json.load(response)
    except urllib.error.HTTPError as exc:
        raise ApiError(f"{exc.code}: {exc.read().decode()}") from None
    except urllib.error.URLError as exc:
        raise ApiError(f"cannot reach {api}: {exc.reason}") from None


def cmd_search(args: argparse.Namespace) -> int:
    query = urllib.parse.urlencode({"q": args.text, "k": args.k, "mode": args.mode})
    result = _get_json(args.api, f"/search?{query}")
    if args.json:
        print(json.dumps(result, indent=2))
        return 0
    print(f"{len(result['hits'])} hits · mode {result['mode']} · model {result['model_version']}"
          f" · query {result['query_id']}")
    for rank, hit in enumerate(result["hits"], start=1):
        print(f"{rank:>3}  {hit['score']:.4f}  {hit['id']}  {hit['title'][:70]}")
        print(f"{'':>13}{hit['snippet'][:110]}")
    return 0


def cmd_models(args: argparse.Namespace) -> int:
    """Versions with aliases and gate metrics, the arms serving now, and per-arm online metrics."""
    overview = _get_json(args.api, "/models")
    if args.json:
        print(json.dumps(overview, indent=2))
        return 0
    arms = overview["arms"]
    print(f"champion: {arms['champion']}   challenger: {arms['challenger'] or '-'} "
          f"({arms['challenger_share']:.0%} of sessions)   mlflow: {overview['mlflow_uri'] or '-'}")
    print(f"{'version':>7}  {'aliases':<20} {'gate nDCG@10':>12} {'gate hybrid':>11}  tags")
    for version in overview["versions"]:
        metrics, tags = version["metrics"], version["tags"]
        shown = ", ".join(f"{k}={v}" for k, v in sorted(tags.items()) if k.startswith(("gate", "autoglm.")))
        print(f"{version['version']:>7}  {','.join(version['aliases']) or '-':<20} "
              f"{metrics.get('candidate.gate.ndcg_at_10', float('nan')):>12.4f} "
              f"{metrics.get('candidate.gate.hybrid.ndcg_at_10', float('nan')):>11.4f}  {shown}")
    if overview["online"]:
        print(f"\nonline ({overview['online_interval']}):")
        print(f"{'version':<40} {'arm':<10} {'impr.':>6}  {'CTR@10':<21} {'MRR':<21} {'skip rate':<21}")
        for row in overview["online"]:
            cells = [f"{row[m]['value']:.3f} [{row[m]['interval'][0]:.3f}, {row[m]['interval'][1]:.3f}]"
                     for m in ("ctr@10", "mrr", "skip_rate")]
            print(f"{row['version']:<40} {row['arm']:<10} {row['impressions']:>6}  " + " ".join(f"{c:<21}" for c in cells))
    for check in ("canary", "champion_watch"):
        if overview.get(check):
            print(f"{check.replace('_', ' ')}: {overview[check]}")
    return 0


def _registry(args: argparse.Namespace):
    from registry.models import ModelRegistry

    uri = args.mlflow_uri or _get_json(args.api, "/models")["mlflow_uri"]
    if not uri:
        raise ApiError("the API runs without MLflow; pass --mlflow-uri")
    return ModelRegistry(uri)


def cmd_promote(args: argparse.Namespace) -> int:
    """Point an alias (champion by default) at a version: what a person does in the MLflow UI."""
    _registry(args).set_alias(args.alias, args.version)
    print(f"{args.alias} -> version {args.version}; serving follows within seconds (webhook) "
          f"or one alias poll")
    return 0


def cmd_rollback(args: argparse.Namespace) -> int:
    from registry.rollback import roll_back

    try:
        print(roll_back(_registry(args), reason=f"manual: {args.reason}"))
    except LookupError as exc:
        raise ApiError(str(exc)) from None
    return 0


def cmd_cdc_postgres(args: argparse.Namespace) -> int:
    """Debezium's Postgres connector in this process, publishing change events to the broker."""
    from streams.postgres_source import PostgresSource, PostgresSourceConfig, SourceError

    tables = tuple(t.strip() for t in args.tables.split(",") if t.strip())
    source = PostgresSource(PostgresSourceConfig(args.dsn, tables, args.topic_prefix, args.broker,
                                                 Path(args.data_dir), slot_name=args.slot))
    _stop_on_signals(source.stop)
    print(f"cdc: {', '.join(source.config.topics())} on {args.broker}", flush=True)
    try:
        source.run()
    except SourceError as exc:
        print(f"autoglm: {exc}", file=sys.stderr)
        return 1
    print(f"cdc: stopped after publishing {source.published} records", flush=True)
    return 0


def cmd_reindex(args: argparse.Namespace) -> int:
    """Build a new Elasticsearch index with the current mappings and swap the alias to it."""
    from search.elasticsearch import ElasticsearchIndex

    if not args.es_url:
        print("autoglm: reindex needs --es-url (or AUTOGLM_ES_URL)", file=sys.stderr)
        return 2
    index = ElasticsearchIndex(args.es_url, args.es_index)
    try:
        print(f"{args.es_index} -> {index.reindex()}")
    finally:
        index.close()
    return 0


def cmd_load_dataset(args: argparse.Namespace) -> int:
    from autoglm.datasets import publish_corpus

    topic, count = publish_corpus(args.broker, Path(args.dataset), limit=args.limit)
    print(f"published {count} snapshot events to {topic}")
    return 0


def cmd_simulate(args: argparse.Namespace) -> int:
    from autoglm.simulate import ClickModel, simulate

    if args.click_model != "pbm":
        print("autoglm: only the position-based click model (pbm) is available", file=sys.stderr)
        return 2
    report = simulate(args.api, Path(args.dataset), args.queries, split=args.split, seed=args.seed,
                      model=ClickModel(eta=args.eta, click_relevant=args.click_relevant, click_noise=args.noise))
    share = report.relevant_clicks / report.clicks if report.clicks else 0.0
    print(f"{report.searches} searches over {len(report.queries)} queries: {report.clicks} clicks, "
          f"{share:.0%} on relevant documents")
    return 0


def cmd_demo(args: argparse.Namespace) -> int:
    from roles.demo import run_demo

    run_demo(Path(args.dataset), Path(args.data_dir), rounds=args.rounds, window=args.window_size,
             learning_rate=args.learning_rate, train_seconds=args.train_seconds, docs=args.docs, out=Path(args.out))
    return 0


def _healthy(api: str) -> bool:
    try:
        with urllib.request.urlopen(f"{api}/healthz", timeout=2) as response:
            return response.status == 200
    except (urllib.error.URLError, ConnectionError, TimeoutError):
        return False


def _stop_on_signals(stop) -> None:
    def handler(_signum, _frame):
        threading.Thread(target=stop, daemon=True).start()

    signal.signal(signal.SIGINT, handler)
    signal.signal(signal.SIGTERM, handler)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="autoglm", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)

    broker = sub.add_parser("broker", help="run the embedded Kafka-protocol broker on 127.0.0.1")
    broker.add_argument("--port", type=int, help="default: a free port")
    broker.set_defaults(func=cmd_broker)

    up = sub.add_parser("up", help="run the three roles in one worker process on the embedded default "
                                   "(and the embedded broker and an MLflow server)")
    up.add_argument("--broker", help="HOST:PORT of a Kafka cluster; default: start the embedded broker")
    up.add_argument("--mlflow-uri", help="MLflow tracking URI; default: start a local `mlflow server`")
    up.add_argument("--ready-timeout", type=float, default=180.0)
    _add_options(up, ROLE_OPTIONS["worker"])
    up.set_defaults(func=cmd_up)

    role_help = {"worker": "ingest, search and learning in one process (what `up` runs)",
             "ingest": "the CDC stream processors; replicas share the CDC topics' partitions",
             "serve": "the search, feedback and webhook API; stateless, run any number behind a load balancer",
             "learn": "join, windows, training, gate, registry, online metrics, rollback; one active, "
                      "the others stand by"}
    for role, description in role_help.items():
        command = sub.add_parser(role, help=description, description=description)
        command.add_argument("--broker", required=True, help="HOST:PORT of the Kafka cluster")
        command.add_argument("--mlflow-uri", help="MLflow tracking URI; without it there is no model registry")
        _add_options(command, ROLE_OPTIONS[role])
        command.set_defaults(func=_run_role(_role_runner(role), role))

    search = sub.add_parser("search", help="query the search API")
    search.add_argument("text")
    search.add_argument("-k", type=int, default=10)
    search.add_argument("--mode", default="hybrid", choices=["bm25", "dense", "hybrid"])
    search.add_argument("--json", action="store_true", help="print the raw JSON answer")
    search.add_argument("--api", default=os.environ.get("AUTOGLM_API", DEFAULT_API))
    search.set_defaults(func=cmd_search)
    models = sub.add_parser("models", help="versions, aliases, gate and online metrics")
    models.add_argument("--json", action="store_true")
    models.add_argument("--api", default=os.environ.get("AUTOGLM_API", DEFAULT_API))
    models.set_defaults(func=cmd_models)
    promote = sub.add_parser("promote", help="move the champion (or another) alias to a version")
    promote.add_argument("version")
    promote.add_argument("--alias", default="champion", choices=["champion", "challenger"])
    rollback = sub.add_parser("rollback", help="remove the challenger, or else restore the previous champion")
    rollback.add_argument("--reason", default="requested from the command line")
    for command, handler in ((promote, cmd_promote), (rollback, cmd_rollback)):
        command.add_argument("--api", default=os.environ.get("AUTOGLM_API", DEFAULT_API),
                             help="the API whose MLflow server to use (see /models)")
        command.add_argument("--mlflow-uri", help="MLflow tracking URI (default: the API's)")
        command.set_defaults(func=handler)

    reindex = sub.add_parser("reindex", help="rebuild the Elasticsearch index and swap its alias")
    reindex.add_argument("--es-url", default=os.environ.get("AUTOGLM_ES_URL"))
    reindex.add_argument("--es-index", default=_D.es_index)
    reindex.set_defaults(func=cmd_reindex)

    cdc = sub.add_parser("cdc", help="run a change-data-capture source")
    cdc_sources = cdc.add_subparsers(dest="source", required=True)
    postgres = cdc_sources.add_parser("postgres", help="Debezium's Postgres connector, in-process")
    postgres.add_argument("--dsn", required=True, help="postgresql://user:password@host:port/dbname")
    postgres.add_argument("--tables", required=True, help="comma-separated schema.table list")
    postgres.add_argument("--topic-prefix", default="cdc.db", help="topics are PREFIX.schema.table")
    postgres.add_argument("--broker", default=Settings().broker)
    postgres.add_argument("--data-dir", default="./autoglm-cdc", help="where the connector keeps its offsets")
    postgres.add_argument("--slot", default="autoglm", help="replication slot (and publication) name")
    postgres.set_defaults(func=cmd_cdc_postgres)

    load = sub.add_parser("load-dataset", help="publish a BEIR corpus as Debezium snapshot events")
    load.add_argument("--dataset", required=True, help="BEIR folder (corpus.jsonl[.gz], queries.jsonl, qrels/)")
    load.add_argument("--broker", required=True)
    load.add_argument("--limit", type=int, help="only the first N documents")
    load.set_defaults(func=cmd_load_dataset)

    sim = sub.add_parser("simulate", help="simulated users: real searches, clicks from a click model")
    sim.add_argument("--dataset", required=True)
    sim.add_argument("--split", default="train", choices=["train"])
    sim.add_argument("--queries", type=int, default=1000, help="number of searches")
    sim.add_argument("--click-model", default="pbm", choices=["pbm"])
    sim.add_argument("--eta", type=float, default=0.8, help="examination 1 / rank ** eta")
    sim.add_argument("--click-relevant", type=float, default=0.9)
    sim.add_argument("--noise", type=float, default=0.1, help="click probability of an irrelevant result")
    sim.add_argument("--seed", type=int, default=0)
    sim.add_argument("--api", default=os.environ.get("AUTOGLM_API", DEFAULT_API))
    sim.set_defaults(func=cmd_simulate)
    demo = sub.add_parser("demo", help="the whole loop end to end on the embedded default")
    demo.add_argument("--dataset", default="../shared/data/scifact")
    demo.add_argument("--data-dir", default="./autoglm-demo", help="a fresh directory for this run")
    demo.add_argument("--rounds", type=int, default=5)
    demo.add_argument("--window-size", type=int, default=1000)
    demo.add_argument("--learning-rate", type=float, default=DEMO_LEARNING_RATE,
                      help="fine-tuning learning rate (default %(default)s: tuned on the dev split, see bench/README.md)")
    demo.add_argument("--train-seconds", type=float, default=DEMO_TRAIN_SECONDS,
                      help="time limit of one fine-tuning run (default %(default)s: a version within 120 s)")
    demo.add_argument("--docs", type=int, help="only the first N documents (a faster, smaller demo)")
    demo.add_argument("--out", default="./autoglm-demo/results")
    demo.set_defaults(func=cmd_demo)
    return parser


def main(argv: list[str] | None = None) -> int:
    logging.basicConfig(level=os.environ.get("AUTOGLM_LOG_LEVEL", "WARNING").upper(),
                        format="%(asctime)s %(levelname)s %(name)s: %(message)s")
    args = build_parser().parse_args(argv)
    try:
        return args.func(args)
    except ApiError as exc:
        print(f"autoglm: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    sys.exit(main())
