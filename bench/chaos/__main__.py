"""``python -m bench.chaos``: the chaos run from the command line (see bench/README.md)."""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import sys
from pathlib import Path

from bench.chaos.run import ChaosConfig, run_chaos


def _range(text: str) -> tuple[float, float]:
    low, sep, high = text.partition("-")
    try:
        pair = (float(low), float(high if sep else low))
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected A-B (seconds), got {text!r}") from None
    if pair[0] < 0 or pair[1] < pair[0]:
        raise argparse.ArgumentTypeError(f"expected 0 <= A <= B, got {text!r}")
    return pair


def parse_args(argv: list[str] | None = None) -> tuple[ChaosConfig, bool]:
    """The run's configuration, and whether to print the report as JSON."""
    parser = argparse.ArgumentParser(
        prog="python -m bench.chaos", description="Kill lipia at random while clients pay; check invariants."
    )
    defaults = ChaosConfig()
    parser.add_argument("--checkouts", type=int, default=defaults.checkouts)
    parser.add_argument("--concurrency", type=int, default=defaults.concurrency)
    parser.add_argument("--kills", type=int, default=defaults.kills)
    parser.add_argument("--kill-interval", type=_range, default=defaults.kill_interval, metavar="A-B")
    parser.add_argument("--down-time", type=_range, default=defaults.down_time, metavar="A-B")
    parser.add_argument("--kill-mode", choices=["random", "quiet"], default=defaults.kill_mode)
    parser.add_argument("--instances", type=int, default=defaults.instances)
    parser.add_argument(
        "--database-url",
        default=None,
        help="An existing, empty database for lipia (e.g. postgresql://...); default a SQLite file.",
    )
    parser.add_argument(
        "--mode",
        choices=["simulator", "live"],
        default=defaults.mode,
        help="live: lipia as a merchant runs it (sandbox mode, confirmation on, https public URL).",
    )
    parser.add_argument("--targeted-fraction", type=float, default=defaults.targeted_fraction)
    parser.add_argument("--no-faults", action="store_true", help="No dropped or duplicated callbacks.")
    parser.add_argument("--fault-interval", type=_range, default=defaults.fault_interval, metavar="A-B")
    parser.add_argument("--callback-delay", type=float, default=defaults.callback_delay)
    parser.add_argument("--prompt-timeout", type=float, default=defaults.prompt_timeout)
    parser.add_argument("--expire-after", type=float, default=defaults.expire_after)
    parser.add_argument("--checkout-timeout", type=float, default=defaults.checkout_timeout)
    parser.add_argument("--settle-timeout", type=float, default=defaults.settle_timeout)
    parser.add_argument("--seed", type=int, default=None)
    parser.add_argument("--workdir", type=Path, default=None, help="Keep the database and logs here.")
    parser.add_argument("--json", action="store_true", help="Print the report as JSON.")
    parser.add_argument("-v", "--verbose", action="store_true")
    args = parser.parse_args(argv)
    config = ChaosConfig(
        checkouts=args.checkouts,
        concurrency=args.concurrency,
        kills=args.kills,
        kill_interval=args.kill_interval,
        down_time=args.down_time,
        kill_mode=args.kill_mode,
        mode=args.mode,
        instances=args.instances,
        database_url=args.database_url,
        targeted_fraction=args.targeted_fraction,
        faults=not args.no_faults,
        fault_interval=args.fault_interval,
        callback_delay=args.callback_delay,
        prompt_timeout=args.prompt_timeout,
        expire_after=args.expire_after,
        checkout_timeout=args.checkout_timeout,
        settle_timeout=args.settle_timeout,
        seed=args.seed,
        workdir=args.workdir,
        verbose=args.verbose,
    )
    return config, bool(args.json)


def main(argv: list[str] | None = None) -> int:
    config, as_json = parse_args(argv)
    if config.seed is None:
        config.seed = random.randrange(2**32)
    report = asyncio.run(run_chaos(config))
    if as_json:
        output = json.dumps({**report.figures(), "ok": report.ok, "problems": report.problems}, indent=2)
    else:
        faults = "on" if config.faults else "off"
        output = (
            f"seed {config.seed}, {config.mode} mode, kill mode {config.kill_mode}, faults {faults}\n"
            f"{report.format()}"
        )
    sys.stdout.write(output + "\n")
    return 0 if report.ok else 1


if __name__ == "__main__":
    sys.exit(main())
