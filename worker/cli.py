"""The `streamadapt` command line. Every failure the operator can fix ends in one line on stderr."""
from __future__ import annotations

import argparse
import logging
import sys
from pathlib import Path
from typing import NoReturn

from worker.features import USER_MEMORY_DAYS
from worker.settings import OPTIONS, SettingsError, load_settings

EXIT_USAGE = 2
LOG_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line instead of usage + error
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see --help)\n")


def _add_settings_flags(parser: argparse.ArgumentParser, parts: set[str | None]) -> None:
    """One flag per setting of the given parts (None = top level), named like its variable."""
    group = parser.add_argument_group("settings (flag, or the environment variable named after it)")
    for option in OPTIONS:
        if option.part not in parts:
            continue
        help_text = f"{option.description} [{option.env}]"
        if option.annotation is bool:  # --flag and --no-flag, but a negative setting (--no-finetune) has one form
            action = "store_true" if option.field.startswith("no_") else argparse.BooleanOptionalAction
            group.add_argument(option.flag, dest=option.env, action=action, default=None, help=help_text)
        else:
            group.add_argument(option.flag, dest=option.env, default=None, metavar="VALUE", help=help_text)


def build_parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="streamadapt", description="Keep a deep model fresh on a live Kafka event stream.")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=_Parser)

    gen = commands.add_parser("generate", help="write a synthetic purchase stream (JSONL), deterministic by seed")
    gen.add_argument("--out", type=Path, required=True, help="JSONL file to write")
    gen.add_argument("--events", type=int, required=True, help="number of events")
    gen.add_argument("--users", type=int, default=None, help="number of users (default: events / 30, at least 50)")
    gen.add_argument("--market", choices=("source", "target"), default="source")
    gen.add_argument("--drift-at", type=int, default=None, help="event index from which the market drifts")
    gen.add_argument("--seed", type=int, default=0)

    pre = commands.add_parser("pretrain", help="train the source checkpoint on an event file")
    pre.add_argument("--events", type=Path, required=True, help="JSONL event file")
    pre.add_argument("--out", type=Path, required=True, help="checkpoint directory to write")
    pre.add_argument("--task", choices=("next_category", "repurchase"), default="next_category")
    pre.add_argument("--horizon-days", type=float, default=7.0, help="repurchase horizon in days")
    pre.add_argument("--user-memory-days", type=float, default=USER_MEMORY_DAYS,
                     help="a user idle for longer is forgotten, in pretraining and serving alike (event time; "
                          "default: %(default)g, so that yearly customers are remembered)")
    pre.add_argument("--epochs", type=int, default=12, help="at most this many epochs (early stopping)")
    pre.add_argument("--seed", type=int, default=0)

    rep = commands.add_parser("replay", help="produce a JSONL event file to the input topic")
    rep.add_argument("--events", type=Path, required=True, help="JSONL event file; lines are sent unchanged")
    rep.add_argument("--rate", type=float, default=None, metavar="EVENTS_PER_S", help="fixed send rate")
    _add_settings_flags(rep, {"kafka"})

    run = commands.add_parser(
        "run", help="run the worker and/or the trainer",
        description="Consume, validate, dedupe, predict and publish; join labels and score served predictions; "
                    "and (role all or trainer) fine-tune from the source checkpoint and promote through the gate. "
                    "--role all runs the trainer in a child process whose metrics port is --metrics-port + 1. "
                    "--no-finetune serves the source model unchanged: the static baseline. "
                    "Every flag can also be set by the environment variable shown with it.")
    _add_settings_flags(run, {None, "kafka", "redis", "metrics", "training"})

    models = commands.add_parser("models", help="list, show or roll back model versions")
    models.add_argument("action", choices=("list", "show", "rollback"))
    models.add_argument("version", nargs="?", help="the version to show or roll back to")
    _add_settings_flags(models, {None, "kafka", "redis"})

    bench = commands.add_parser("bench", help="benchmarks: throughput (drain rate, latency) and adaptation (BENCHMARKS.md)")
    benches = bench.add_subparsers(dest="which", required=True, parser_class=_Parser)
    throughput = benches.add_parser("throughput", help="the worker's drain rate and latency at fixed rates, against "
                                                       "bare loops on each Kafka client")
    throughput.add_argument("--events", type=int, default=100_000, help="backlog size")
    throughput.add_argument("--source-checkpoint", type=Path, default=None,
                            help="model to serve (default: pretrain a small one)")
    throughput.add_argument("--repeat", type=int, default=3, help="runs per contender; the medians are reported")
    throughput.add_argument("--out", type=Path, default=None, help="write the figures as JSON here")
    throughput.add_argument("--latency-seconds", type=float, default=60.0,
                            help="length of each latency row (1k, 2k, 5k, 8k events/s and half the drain rate; "
                                 "0 skips them)")
    _add_settings_flags(throughput, {"kafka", "redis"})
    adaptation = benches.add_parser(
        "adaptation", help="prequential quality of adapted serving against static, scratch, River, frequency "
                           "baselines and an oracle (offline, by the worker's own code; the checkpoint's task)",
        description="On a real log: --events FILE --source-until DATE pretrains a source checkpoint on the events "
                    "before DATE (--task, --horizon-days) and judges every contender on the events after it. With "
                    "--source-checkpoint, that checkpoint serves and --drift-at splits the file (default: its middle). "
                    "Without --events, a drifting target stream is generated and a checkpoint pretrained on a "
                    "generated source market.")
    adaptation.add_argument("--events", type=Path, default=None,
                            help="JSONL events to replay (default: generate a drifting target stream)")
    adaptation.add_argument("--source-until", type=_utc_date, default=None, metavar="DATE",
                            help="pretrain on the events before this ISO date (or date and time), judge after it")
    adaptation.add_argument("--task", choices=("next_category", "repurchase"), default="next_category",
                            help="the task pretrained (with --source-until, or without --events)")
    adaptation.add_argument("--horizon-days", type=float, default=7.0, help="repurchase horizon in days, as pretrain's")
    adaptation.add_argument("--generate", type=int, default=30_000, help="events to generate when --events is not given")
    adaptation.add_argument("--drift-at", type=int, default=None,
                            help="event index where the stream is split (default: 12,000 of a generated stream, "
                                 "else the middle)")
    adaptation.add_argument("--source-checkpoint", type=Path, default=None,
                            help="source checkpoint, next_category or repurchase: the task judged (instead of "
                                 "pretraining one)")
    adaptation.add_argument("--strategies", default="l2sp", help="fine-tune strategies to replay; the goals judge the first")
    adaptation.add_argument("--river", choices=("all", "linear", "none"), default="all",
                            help="River's learners to replay: all, the linear one only (the trees take hours on a "
                                 "multiclass log), or none")
    adaptation.add_argument("--no-oracle", action="store_true", help="skip the oracle (trained five times over)")
    adaptation.add_argument("--through-worker", action="store_true",
                            help="also run the log through real workers (static, then adapted) on Kafka and Redis, and "
                                 "check that static serving there is the replay's")
    adaptation.add_argument("--replay-rate", type=float, default=None, metavar="EVENTS_PER_S",
                            help="with --through-worker: replay the log into Kafka at this rate (default: as fast as "
                                 "it goes)")
    adaptation.add_argument("--curve-sizes", default="250,500,1000,2000",
                            help="target examples of the transfer curve, comma-separated (empty: no curve)")
    adaptation.add_argument("--out", type=Path, default=None, help="write the figures as JSON here")
    adaptation.add_argument("--plot", type=Path, default=None, help="write the rolling-quality plot here (PNG)")
    _add_settings_flags(adaptation, {"training", "kafka", "redis"})

    watch = commands.add_parser("watch", help="follow a worker's /metrics and print progress every second")
    watch.add_argument("--metrics-url", default="http://127.0.0.1:9400/metrics")
    watch.add_argument("--until-handled", type=int, default=None,
                       help="stop once this many records are committed (predicted, dead-lettered or duplicates); "
                            "exit 1 if --timeout-s passes first")
    watch.add_argument("--timeout-s", type=float, default=600.0,
                       help="stop after this long (a worker that stops answering for 30 s ends it sooner, with exit 1)")
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.INFO, format=LOG_FORMAT)
    logging.getLogger("kafka").setLevel(logging.WARNING)  # its INFO level narrates every connection
    # kafka-python 3's network thread warns whenever it waited >100 ms for the interpreter lock, which the
    # serving thread holds for a whole batch by design: noise, not a fault
    logging.getLogger("kafka.net.selector").setLevel(logging.ERROR)
    from kafka.errors import KafkaError
    from redis import RedisError

    try:
        return _dispatch(args)
    except KeyboardInterrupt:
        return 130
    except (SettingsError, ValueError, OSError, RuntimeError) as error:
        print(f"streamadapt {args.command}: error: {error}", file=sys.stderr)
        return EXIT_USAGE if isinstance(error, SettingsError) else 1
    except KafkaError as error:
        print(f"streamadapt {args.command}: error: Kafka: {error} (is STREAMADAPT_KAFKA_BOOTSTRAP right?)", file=sys.stderr)
        return 1
    except RedisError as error:
        print(f"streamadapt {args.command}: error: Redis: {error} (is STREAMADAPT_REDIS_URL right?)", file=sys.stderr)
        return 1


def _utc_date(text: str):
    """An ISO date or date and time, as an aware datetime (UTC when it names no zone)."""
    from datetime import datetime, timezone

    try:
        moment = datetime.fromisoformat(text)
    except ValueError as error:
        raise argparse.ArgumentTypeError(f"{text!r} is not an ISO date such as 1997-07-01") from error
    return moment if moment.tzinfo else moment.replace(tzinfo=timezone.utc)


def _sizes(text: str) -> tuple[int, ...]:
    try:
        sizes = tuple(int(part) for part in text.split(",") if part.strip())
    except ValueError as error:
        raise SettingsError(f"--curve-sizes takes comma-separated counts, not {text!r}") from error
    if any(size < 10 for size in sizes):
        raise SettingsError("--curve-sizes must be at least 10 each")
    return sizes


def _bench_adaptation(args: argparse.Namespace) -> None:
    import json
    import tempfile

    from worker.bench_adaptation import run_adaptation_bench
    from worker.finetune import STRATEGIES
    from worker.generate import generate_events, write_events
    from worker.pretrain import pretrain, read_events

    strategies = tuple(s for s in args.strategies.split(",") if s)
    unknown = [s for s in strategies if s not in STRATEGIES]
    if unknown or not strategies:
        raise SettingsError(f"--strategies takes some of {', '.join(STRATEGIES)}, not {args.strategies!r}")
    if args.source_until is not None and (args.events is None or args.source_checkpoint is not None):
        raise SettingsError("--source-until needs --events, and pretrains its own checkpoint: no --source-checkpoint")
    settings = load_settings(_settings_overrides(args))
    training = settings.training
    if args.replay_rate is not None and not (args.through_worker and args.replay_rate > 0):
        raise SettingsError("--replay-rate goes with --through-worker, and must be positive")
    with tempfile.TemporaryDirectory(prefix="streamadapt-bench-") as scratch:
        checkpoint, split_at = args.source_checkpoint, args.drift_at
        if args.events is not None:
            events, refused = read_events(args.events)
            if refused:
                print(f"{refused} lines of {args.events} are not valid events and are left out")
            if args.source_until is not None:
                until_s = args.source_until.timestamp()
                source_file = Path(scratch) / "source.jsonl"
                source_file.write_text("".join(json.dumps(e.model_dump(mode="json")) + "\n"
                                               for e in events if e.ts_s < until_s))
                print(f"pretraining a {args.task} checkpoint on the events before {args.source_until.isoformat()}")
                try:
                    result = pretrain(source_file, Path(scratch) / "checkpoint", task=args.task,
                                      horizon_days=args.horizon_days)
                except ValueError as error:  # it names the file: name the user's log instead of our copy
                    raise ValueError(str(error).replace(
                        str(source_file), f"{args.events} before {args.source_until.date().isoformat()}")) from error
                for warning in result.warnings:
                    print(f"warning: {warning}")
                checkpoint = Path(scratch) / "checkpoint"
                split_at = sum(1 for e in events if e.ts_s < until_s)
        else:
            if args.generate < 1000:
                raise SettingsError("--generate must be at least 1000")
            from schemas import PurchaseEvent

            split_at = args.drift_at if args.drift_at is not None else min(12_000, args.generate // 2)
            events = [PurchaseEvent.model_validate(e) for e in
                      generate_events(events=args.generate, market="target", drift_at=split_at, seed=7)]
        if checkpoint is None:
            print(f"no --source-checkpoint: pretraining a {args.task} one on 60,000 generated source events")
            source = Path(scratch) / "source.jsonl"
            write_events(source, events=60_000, market="source", seed=98)
            pretrain(source, Path(scratch) / "checkpoint", task=args.task, horizon_days=args.horizon_days)
            checkpoint = Path(scratch) / "checkpoint"
        result = run_adaptation_bench(events, checkpoint, split_at, training, out=args.out, plot_path=args.plot,
                                      strategies=strategies, river=args.river, with_oracle=not args.no_oracle,
                                      oracle_goal=args.events is None, curve_sizes=_sizes(args.curve_sizes))
        if args.through_worker:
            from worker.bench_adaptation import MEASURE
            from worker.bench_adaptation_e2e import print_through_worker, run_through_worker
            from worker.bench_json import write_json

            result.update(run_through_worker(settings, events, checkpoint, result["split_at"], args.replay_rate))
            print_through_worker(result, MEASURE[result["task"]])
            if args.out is not None:
                write_json(args.out, result)


def _settings_overrides(args: argparse.Namespace) -> dict:
    return {k: v for k, v in vars(args).items() if k.startswith("STREAMADAPT_")}


def _dispatch(args: argparse.Namespace) -> int:
    if args.command == "generate":
        from worker.generate import write_events

        count = write_events(args.out, events=args.events, users=args.users, market=args.market,
                             drift_at=args.drift_at, seed=args.seed)
        print(f"wrote {count} {args.market} events to {args.out}")
    elif args.command == "pretrain":
        from worker.pretrain import pretrain

        if not (args.horizon_days > 0 and args.user_memory_days > 0):
            raise SettingsError("--horizon-days and --user-memory-days must be positive")
        result = pretrain(args.events, args.out, task=args.task, horizon_days=args.horizon_days,
                          epochs=args.epochs, seed=args.seed, user_memory_days=args.user_memory_days)
        shown = ", ".join(f"{k}={v:.4f}" for k, v in result.validation.items() if k != "examples")
        print(f"wrote {args.task} checkpoint {result.meta.version} to {args.out} (validation on the newest "
              f"{result.validation['examples']:,.0f} settled examples: {shown}; training log_loss="
              f"{result.training_log_loss:.4f})")
        for warning in result.warnings:
            print(f"streamadapt pretrain: warning: {warning}", file=sys.stderr)
    elif args.command == "replay":
        from worker.replay import replay

        settings = load_settings(_settings_overrides(args))
        sent, seconds = replay(args.events, settings.kafka, args.rate,
                               on_progress=lambda n: print(f"  sent {n}", file=sys.stderr))
        print(f"sent {sent} records to {settings.kafka.input_topic} in {seconds:.1f} s "
              f"({sent / max(seconds, 1e-9):.0f} records/s)")
    elif args.command == "run":
        settings = load_settings(_settings_overrides(args))
        from worker.service import run

        logging.getLogger().setLevel(settings.log_level)
        run(settings)
    elif args.command == "models":
        from worker.operator import models_command

        if args.action in ("show", "rollback") and not args.version:
            raise SettingsError(f"models {args.action} needs a VERSION")
        settings = load_settings(_settings_overrides(args))
        print(models_command(settings, args.action, args.version))
    elif args.command == "bench" and args.which == "throughput":
        from worker.bench_throughput import run_throughput_bench

        if args.events < 100 or args.repeat < 1 or args.latency_seconds < 0:
            raise SettingsError("--events must be at least 100, --repeat at least 1 and --latency-seconds not negative")
        settings = load_settings(_settings_overrides(args))
        run_throughput_bench(settings, args.events, args.source_checkpoint, args.out, repeat=args.repeat,
                             latency_s=args.latency_seconds)
    elif args.command == "bench":
        _bench_adaptation(args)
    elif args.command == "watch":
        from worker.watch import watch

        final = watch(args.metrics_url, args.until_handled, args.timeout_s)
        print("summary: " + ", ".join(f"{k}={v:.0f}" for k, v in final.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
