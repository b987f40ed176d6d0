"""The benchmarks' command line: `python -m benchmarks throughput|scaling|serving-paths|adaptation`, from a checkout
(BENCHMARKS.md).

The benchmarks are not part of the installed package: they drive it from outside, as a user would, and take
the same settings flags and environment variables as `streamadapt run`.
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

from streamadapt.cli import (
    Parser,
    add_settings_flags,
    run_reporting_errors,
    settings_overrides,
)
from streamadapt.settings import SettingsError, load_settings


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="python -m benchmarks",
                    description="streamadapt's benchmarks: throughput (drain rate, latency) and adaptation quality")
    benches = parser.add_subparsers(dest="which", required=True, parser_class=Parser)
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
    add_settings_flags(throughput, {"kafka", "redis"})
    scaling = benches.add_parser("scaling", help="drain rate with 1, 2 and 3 serving processes, on a single Redis and "
                                                 "on a Redis Cluster, with the CPU and bytes each event costs")
    scaling.add_argument("--events", type=int, default=120_000, help="backlog size of each drain")
    scaling.add_argument("--source-checkpoint", type=Path, default=None,
                         help="model to serve (default: pretrain a small one)")
    scaling.add_argument("--processes", default="1,2,3", help="serving process counts, comma-separated")
    scaling.add_argument("--cluster-url", default=None,
                         help="URL of a node of a Redis Cluster to measure too (scripts/dev-stack up --redis-cluster)")
    scaling.add_argument("--out", type=Path, default=None, help="write the figures as JSON here")
    add_settings_flags(scaling, {"kafka", "redis"})
    paths = benches.add_parser("serving-paths", help="one batch on the NumPy serving path against TensorFlow, "
                                                     "on the same checkpoint")
    paths.add_argument("--source-checkpoint", type=Path, required=True, help="checkpoint to serve both ways")
    paths.add_argument("--repeats", type=int, default=200, help="timed batches per size and path")
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
    add_settings_flags(adaptation, {"training", "kafka", "redis"})

    return parser


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

    from benchmarks.adaptation import run_adaptation_bench
    from streamadapt.ops.generate import generate_events, write_events
    from streamadapt.settings import STRATEGIES
    from streamadapt.training.pretrain import pretrain, read_events

    strategies = tuple(s for s in args.strategies.split(",") if s)
    unknown = [s for s in strategies if s not in STRATEGIES]
    if unknown or not strategies:
        raise SettingsError(f"--strategies takes some of {', '.join(STRATEGIES)}, not {args.strategies!r}")
    if args.source_until is not None and (args.events is None or args.source_checkpoint is not None):
        raise SettingsError("--source-until needs --events, and pretrains its own checkpoint: no --source-checkpoint")
    settings = load_settings(settings_overrides(args))
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
            from streamadapt.schemas import PurchaseEvent

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
            from benchmarks.adaptation import MEASURE
            from benchmarks.adaptation_e2e import (
                print_through_worker,
                run_through_worker,
            )
            from benchmarks.results import write_json

            result.update(run_through_worker(settings, events, checkpoint, result["split_at"], args.replay_rate))
            print_through_worker(result, MEASURE[result["task"]])
            if args.out is not None:
                write_json(args.out, result)


def _dispatch(args: argparse.Namespace) -> int:
    if args.which == "serving-paths":
        from benchmarks.serving_paths import measure_paths, print_paths

        if args.repeats < 1:
            raise SettingsError("--repeats must be at least 1")
        print_paths(measure_paths(args.source_checkpoint, args.repeats))
    elif args.which == "throughput":
        from benchmarks.throughput import run_throughput_bench

        if args.events < 100 or args.repeat < 1 or args.latency_seconds < 0:
            raise SettingsError("--events must be at least 100, --repeat at least 1 and --latency-seconds not negative")
        settings = load_settings(settings_overrides(args))
        run_throughput_bench(settings, args.events, args.source_checkpoint, args.out, repeat=args.repeat,
                             latency_s=args.latency_seconds)
    elif args.which == "scaling":
        from benchmarks.scaling import run_scaling_bench

        try:
            processes = [int(part) for part in args.processes.split(",") if part.strip()]
        except ValueError:
            processes = []
        if not processes or min(processes) < 1 or args.events < 1000:
            raise SettingsError("--processes takes comma-separated counts of 1 or more, and --events at least 1000")
        settings = load_settings(settings_overrides(args))
        run_scaling_bench(settings, args.cluster_url, processes, args.events, args.source_checkpoint, args.out)
    else:
        _bench_adaptation(args)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return run_reporting_errors(f"python -m benchmarks {args.which}", lambda: _dispatch(args))


if __name__ == "__main__":
    sys.exit(main())
