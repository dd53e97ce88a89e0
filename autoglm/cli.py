"""The ``autoglm`` command line: broker, up, search (and the worker process that ``up`` runs)."""

from __future__ import annotations

import argparse
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
from pathlib import Path

from autoglm.settings import DEMO_LEARNING_RATE, DEMO_TRAIN_SECONDS, ApiLimits, Settings

DEFAULT_API = "http://127.0.0.1:8000"
# The search API's limits (search/limits.py): option -> (ApiLimits field, help).
API_LIMIT_OPTIONS = {
    "--api-max-body": ("max_body_bytes", "largest request body in bytes; 413 beyond"),
    "--api-max-webhook-body": ("max_webhook_body_bytes",
                               "largest /hooks/mlflow body in bytes, refused before its signature is checked"),
    "--api-max-feedback-items": ("max_feedback_items", "most events in one POST /feedback; 413 beyond"),
    "--api-max-query-chars": ("max_query_chars", "longest /search q in characters; 422 beyond"),
    "--api-header-timeout": ("header_timeout_s", "seconds a client has to send its request headers; 408 after"),
    "--api-body-timeout": ("body_timeout_s", "seconds a client has to send its request body; 408 after"),
    "--api-max-concurrency": ("max_concurrent_requests",
                              "requests in flight beyond which the API answers 503 with Retry-After"),
}


def _dest(option: str) -> str:
    return option.removeprefix("--").replace("-", "_")


def _settings(args: argparse.Namespace, broker: str) -> Settings:
    return Settings(broker=broker, group_id=args.group_id, data_dir=Path(args.data_dir),
                    api_port=args.api_port, window_size=args.window_size, window_minutes=args.window_minutes,
                    window_min=args.window_min,
                    feedback_max_wait_s=args.feedback_max_wait, mlflow_uri=args.mlflow_uri,
                    feedback_retention_s=args.feedback_retention,
                    gate_dataset=Path(args.gate_dataset) if args.gate_dataset else None,
                    promote_champion=args.promote_champion, query_runtime=args.query_runtime,
                    challenger_share=args.challenger_share, learning_rate=args.learning_rate,
                    train_max_seconds=args.train_seconds, propensities=args.propensities,
                    alias_poll_s=args.alias_poll,
                    webhooks=not args.no_webhooks, online_settle_s=args.online_settle,
                    auto_rollback=not args.no_auto_rollback, champion_watch=args.champion_watch,
                    index_backend=args.index, es_url=args.es_url, es_index=args.es_index,
                    cdc_topics=args.cdc_topics, dead_letter_max_bytes=args.dead_letter_max_bytes,
                    api_limits=ApiLimits(**{field: getattr(args, _dest(option))
                                            for option, (field, _) in API_LIMIT_OPTIONS.items()}),
                    mapping_file=Path(args.mapping) if args.mapping else None)


def _add_worker_options(parser: argparse.ArgumentParser) -> None:
    defaults = Settings()
    parser.add_argument("--data-dir", default=str(defaults.data_dir), help="index and state directory")
    parser.add_argument("--api-port", type=int, default=defaults.api_port)
    for option, (field, description) in API_LIMIT_OPTIONS.items():
        default = getattr(defaults.api_limits, field)
        parser.add_argument(option, type=type(default), default=default, help=f"{description} (default %(default)s)")
    parser.add_argument("--cdc-topics", default=defaults.cdc_topics,
                        help="regular expression of the Debezium topics to index (default %(default)s)")
    parser.add_argument("--mapping", help="TOML file mapping table rows to documents")
    parser.add_argument("--dead-letter-max-bytes", type=int, default=defaults.dead_letter_max_bytes,
                        help="a larger dead letter is sent as a reference to its record (default %(default)s)")
    parser.add_argument("--window-size", type=int, default=defaults.window_size,
                        help="train when this many new examples exist (default %(default)s)")
    parser.add_argument("--window-minutes", type=float, default=defaults.window_minutes,
                        help="... or after this many minutes with a minimum of examples (default %(default)s)")
    parser.add_argument("--window-min", type=int, default=defaults.window_min,
                        help="... the minimum of examples for a window closed on time (default %(default)s)")
    parser.add_argument("--feedback-max-wait", type=float, default=defaults.feedback_max_wait_s,
                        help="seconds feedback waits for its impression (default %(default)s)")
    parser.add_argument("--feedback-retention", type=float, default=defaults.feedback_retention_s,
                        help="seconds after its ts that feedback is still accepted (default %(default)s)")
    parser.add_argument("--learning-rate", type=float, default=defaults.learning_rate,
                        help="AdamW learning rate of each window's fine-tuning (default %(default)s)")
    parser.add_argument("--train-seconds", type=float, default=defaults.train_max_seconds,
                        help="time limit of one fine-tuning run (default %(default)s)")
    parser.add_argument("--propensities", choices=("prior", "log"), default=defaults.propensities,
                        help="click propensities per rank: the prior 1/rank^0.8, or estimated from the "
                             "click log, which confounds them with relevance (default %(default)s)")
    parser.add_argument("--gate-dataset", help="BEIR folder whose train dev split gates every candidate model")
    parser.add_argument("--promote-champion", action="store_true",
                        help="let the trainer move the champion alias itself (demo; normally a person does)")
    parser.add_argument("--query-runtime", choices=("onnx", "torch"), default=defaults.query_runtime,
                        help="runtime that encodes queries while serving (default %(default)s)")
    parser.add_argument("--challenger-share", type=float, default=defaults.challenger_share,
                        help="share of sessions the challenger version answers (default %(default)s)")
    parser.add_argument("--alias-poll", type=float, default=defaults.alias_poll_s,
                        help="seconds between reads of the MLflow aliases (default %(default)s)")
    parser.add_argument("--no-webhooks", action="store_true",
                        help="follow the aliases by polling only (no MLflow webhook)")
    parser.add_argument("--online-settle", type=float, default=defaults.online_settle_s,
                        help="seconds after which a search counts in the online metrics (default %(default)s)")
    parser.add_argument("--no-auto-rollback", action="store_true",
                        help="never move an alias automatically (the online metrics are still kept)")
    parser.add_argument("--champion-watch", type=int, default=defaults.champion_watch,
                        help="impressions of a newly promoted champion during which it goes back to its "
                             "predecessor if users like it less (0: no watch; default %(default)s)")
    parser.add_argument("--index", choices=("embedded", "elasticsearch"), default=defaults.index_backend,
                        help="index backend (default %(default)s)")
    parser.add_argument("--es-url", default=os.environ.get("AUTOGLM_ES_URL"),
                        help="Elasticsearch URL for --index elasticsearch (default $AUTOGLM_ES_URL)")
    parser.add_argument("--es-index", default=defaults.es_index, help="Elasticsearch index alias")
    parser.add_argument("--group-id", default=defaults.group_id,
                        help="consumer group of the ingest workers (one per index; default %(default)s)")


def cmd_broker(args: argparse.Namespace) -> int:
    from autoglm.broker import EmbeddedBroker
    from autoglm.topics import PLATFORM_TOPICS, ensure_topics

    broker = EmbeddedBroker(port=args.port).start()
    ensure_topics(broker.address, PLATFORM_TOPICS)
    print(f"broker: {broker.address}", flush=True)
    _stop_on_signals(broker.stop)
    return broker.wait()


def cmd_worker(args: argparse.Namespace) -> int:
    from autoglm.worker import DataDirInUse, run_worker

    try:
        run_worker(_settings(args, args.broker))
    except DataDirInUse as exc:
        print(f"autoglm: {exc}", file=sys.stderr)
        return 2
    return 0


def cmd_up(args: argparse.Namespace) -> int:
    """Start the broker (unless --broker), then the worker; print the API address once healthy."""
    from autoglm.broker import EmbeddedBroker
    from autoglm.process import die_with_parent
    from autoglm.topics import PLATFORM_TOPICS, ensure_topics
    from autoglm.worker import DataDirInUse, lock_data_dir

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

    command = [sys.executable, "-m", "autoglm.cli", "worker", "--broker", address,
               "--data-dir", args.data_dir, "--api-port", str(args.api_port),
               "--cdc-topics", args.cdc_topics, "--group-id", args.group_id,
               "--dead-letter-max-bytes", str(args.dead_letter_max_bytes),
               "--window-size", str(args.window_size), "--window-minutes", str(args.window_minutes),
               "--window-min", str(args.window_min),
               "--feedback-max-wait", str(args.feedback_max_wait), "--mlflow-uri", mlflow_uri,
               "--feedback-retention", str(args.feedback_retention)]
    command += ["--query-runtime", args.query_runtime, "--challenger-share", str(args.challenger_share),
                "--alias-poll", str(args.alias_poll), "--online-settle", str(args.online_settle),
                "--champion-watch", str(args.champion_watch),
                "--index", args.index, "--es-index", args.es_index, "--learning-rate", str(args.learning_rate),
                "--train-seconds", str(args.train_seconds), "--propensities", args.propensities]
    command += [arg for option in API_LIMIT_OPTIONS for arg in (option, str(getattr(args, _dest(option))))]
    command += ["--es-url", args.es_url] if args.es_url else []
    command += ["--no-webhooks"] if args.no_webhooks else []
    command += ["--no-auto-rollback"] if args.no_auto_rollback else []
    command += ["--gate-dataset", args.gate_dataset] if args.gate_dataset else []
    command += ["--promote-champion"] if args.promote_champion else []
    command += ["--mapping", args.mapping] if args.mapping else []
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
    api = f"http://127.0.0.1:{args.api_port}"
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
    from autoglm.demo import run_demo

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

    up = sub.add_parser("up", help="run the ingest worker and search API (and the embedded broker)")
    up.add_argument("--broker", help="HOST:PORT of a Kafka cluster; default: start the embedded broker")
    up.add_argument("--ready-timeout", type=float, default=180.0)
    _add_worker_options(up)
    up.set_defaults(func=cmd_up)

    up.add_argument("--mlflow-uri", help="MLflow tracking URI; default: start a local `mlflow server`")

    worker = sub.add_parser("worker", help="one worker process (what `up` runs)")
    worker.add_argument("--broker", required=True)
    worker.add_argument("--mlflow-uri", help="MLflow tracking URI; without it the trainer is off")
    _add_worker_options(worker)
    worker.set_defaults(func=cmd_worker)

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
    reindex.add_argument("--es-index", default=Settings().es_index)
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
