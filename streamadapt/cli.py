"""The `streamadapt` command line. Every failure the operator can fix ends in one line on stderr."""
from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Callable
from pathlib import Path
from typing import NoReturn

import streamadapt
from streamadapt import logs
from streamadapt.core.features import USER_MEMORY_DAYS
from streamadapt.settings import (
    BUILT_IN_FEATURES,
    OPTIONS,
    SettingsError,
    load_settings,
)

EXIT_USAGE = 2


class Parser(argparse.ArgumentParser):
    def error(self, message: str) -> NoReturn:  # one line instead of usage + error
        self.exit(EXIT_USAGE, f"{self.prog}: error: {message} (see --help)\n")


def add_settings_flags(parser: argparse.ArgumentParser, parts: set[str | None]) -> None:
    """One flag per setting of the given parts (None = top level), named like its variable."""
    group = parser.add_argument_group("settings (flag, or the environment variable named after it)")
    for option in OPTIONS:
        if option.part not in parts:
            continue
        help_text = f"{option.description} [{option.env}]"
        if option.annotation is bool and option.field.startswith("no_"):  # --no-finetune, and --finetune to undo it
            group.add_argument(option.flag, dest=option.env, action="store_const", const=True, default=None,
                               help=help_text)
            group.add_argument(option.flag.replace("--no-", "--", 1), dest=option.env, action="store_const",
                               const=False, help=f"the opposite of {option.flag}")
        elif option.annotation is bool:  # --flag and --no-flag
            group.add_argument(option.flag, dest=option.env, action=argparse.BooleanOptionalAction, default=None,
                               help=help_text)
        else:
            group.add_argument(option.flag, dest=option.env, default=None, metavar="VALUE", help=help_text)


def build_parser() -> argparse.ArgumentParser:
    parser = Parser(prog="streamadapt", description="Keep a deep model fresh on a live Kafka event stream.")
    parser.add_argument("--version", action="version", version=f"streamadapt {streamadapt.__version__}")
    commands = parser.add_subparsers(dest="command", required=True, parser_class=Parser)

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
    pre.add_argument("--model-builder", default=None, metavar="MODULE:FUNCTION",
                     help="your own network: FUNCTION(n_features, n_outputs, task) returns an uncompiled Keras model "
                          "(docs/extending.md; default: the built-in one)")
    pre.add_argument("--features", default=BUILT_IN_FEATURES, metavar="MODULE:NAME",
                     help="feature plug-in to train with; `run` must then be given the same (docs/extending.md; "
                          "default: %(default)s)")
    pre.add_argument("--seed", type=int, default=0)

    rep = commands.add_parser("replay", help="produce a JSONL event file to the input topic")
    rep.add_argument("--events", type=Path, required=True, help="JSONL event file; lines are sent unchanged")
    rep.add_argument("--rate", type=float, default=None, metavar="EVENTS_PER_S", help="fixed send rate")
    add_settings_flags(rep, {"kafka"})

    run = commands.add_parser(
        "run", help="run the worker and/or the trainer",
        description="Consume, validate, dedupe, predict and publish; join labels and score served predictions; "
                    "and (role all or trainer) fine-tune from the source checkpoint and promote through the gate. "
                    "--role all runs the trainer in a child process whose metrics port is --metrics-port + 1. "
                    "--no-finetune serves the source model unchanged: the static baseline. "
                    "Every flag can also be set by the environment variable shown with it.")
    add_settings_flags(run, {None, "kafka", "redis", "metrics", "training"})

    models = commands.add_parser("models", help="list, show or roll back model versions")
    models.add_argument("action", choices=("list", "show", "rollback"))
    models.add_argument("version", nargs="?", help="the version to show or roll back to")
    add_settings_flags(models, {None, "kafka", "redis"})

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
    return run_reporting_errors(f"streamadapt {args.command}", lambda: _dispatch(args))


def run_reporting_errors(prog: str, command: Callable[[], int]) -> int:
    """Run `command` with the process's logging set up; a failure the operator can fix ends in one line on
    stderr, headed by `prog`, and an exit status."""
    logs.set_up()
    logging.getLogger("kafka").setLevel(logging.WARNING)  # its INFO level narrates every connection
    # kafka-python 3's network thread warns whenever it waited >100 ms for the interpreter lock, which the
    # serving thread holds for a whole batch by design: noise, not a fault
    logging.getLogger("kafka.net.selector").setLevel(logging.ERROR)
    from kafka.errors import KafkaConnectionError, KafkaError, KafkaTimeoutError
    from redis import RedisError

    from streamadapt.kafka.protocol import KafkaClientError, KafkaUnavailable

    try:
        return command()
    except KeyboardInterrupt:
        return 130
    except (SettingsError, ValueError, OSError, RuntimeError) as error:
        logs.report(f"{prog}: error: {error}")
        return EXIT_USAGE if isinstance(error, SettingsError) else 1
    except (KafkaError, KafkaClientError) as error:
        unreachable = isinstance(error, (KafkaUnavailable, KafkaConnectionError, KafkaTimeoutError))
        hint = " (is STREAMADAPT_KAFKA_BOOTSTRAP right?)" if unreachable else ""
        logs.report(f"{prog}: error: Kafka: {error}{hint}")
        return 1
    except RedisError as error:
        logs.report(f"{prog}: error: Redis: {error} (is STREAMADAPT_REDIS_URL right?)")
        return 1


def settings_overrides(args: argparse.Namespace) -> dict:
    return {k: v for k, v in vars(args).items() if k.startswith("STREAMADAPT_")}


def _dispatch(args: argparse.Namespace) -> int:
    if args.command == "generate":
        from streamadapt.ops.generate import write_events

        count = write_events(args.out, events=args.events, users=args.users, market=args.market,
                             drift_at=args.drift_at, seed=args.seed)
        print(f"wrote {count} {args.market} events to {args.out}")
    elif args.command == "pretrain":
        from streamadapt.training.pretrain import pretrain

        if not (args.horizon_days > 0 and args.user_memory_days > 0):
            raise SettingsError("--horizon-days and --user-memory-days must be positive")
        result = pretrain(args.events, args.out, task=args.task, horizon_days=args.horizon_days,
                          epochs=args.epochs, seed=args.seed, user_memory_days=args.user_memory_days,
                          model_builder=args.model_builder, features_plugin=args.features)
        shown = ", ".join(f"{k}={v:.4f}" for k, v in result.validation.items() if k != "examples")
        print(f"wrote {args.task} checkpoint {result.meta.version} to {args.out} (validation on the newest "
              f"{result.validation['examples']:,.0f} settled examples: {shown}; training log_loss="
              f"{result.training_log_loss:.4f})")
        for warning in result.warnings:
            print(f"streamadapt pretrain: warning: {warning}", file=sys.stderr)
    elif args.command == "replay":
        from streamadapt.ops.replay import replay

        settings = load_settings(settings_overrides(args))
        sent, seconds = replay(args.events, settings.kafka, args.rate,
                               on_progress=lambda n: print(f"  sent {n}", file=sys.stderr))
        print(f"sent {sent} records to {settings.kafka.input_topic} in {seconds:.1f} s "
              f"({sent / max(seconds, 1e-9):.0f} records/s)")
    elif args.command == "run":
        settings = load_settings(settings_overrides(args))
        from streamadapt.service import run

        logs.set_up(settings.log_level, settings.log_format)
        run(settings)
    elif args.command == "models":
        from streamadapt.ops.operator import models_command

        if args.action in ("show", "rollback") and not args.version:
            raise SettingsError(f"models {args.action} needs a VERSION")
        settings = load_settings(settings_overrides(args))
        print(models_command(settings, args.action, args.version))
    elif args.command == "watch":
        from streamadapt.ops.watch import watch

        final = watch(args.metrics_url, args.until_handled, args.timeout_s)
        print("summary: " + ", ".join(f"{k}={v:.0f}" for k, v in final.items()))
    return 0


if __name__ == "__main__":
    sys.exit(main())
