"""The `k2sys` command: the only argument parser in the project.

Subcommands are listed only once they work; each dispatches to a module-level main().
"""

from __future__ import annotations

import argparse
import json
import sys

from k2sys.config import ConfigError, apply_overrides, render


def _cmd_env(args: argparse.Namespace) -> int:
    from k2sys import envinfo

    info = envinfo.collect()
    print(json.dumps(info, indent=2) if args.json else envinfo.format_table(info))
    return 0


def _load_recipe(name: str, overrides: list[str]):
    from k2sys.recipes import get_recipe

    return apply_overrides(get_recipe(name), overrides or [])


def _cmd_config(args: argparse.Namespace) -> int:
    from k2sys.recipes import RECIPES

    if args.action == "list":
        for name, fn in sorted(RECIPES.items()):
            print(f"{name:16s} {(fn.__doc__ or '').strip().splitlines()[0] if fn.__doc__ else ''}")
        return 0
    if not args.recipe:
        raise ConfigError("config show: name a recipe, e.g. `k2sys config show tiny-model`")
    print(render(_load_recipe(args.recipe, args.set)))
    return 0


def _cmd_run(args: argparse.Namespace) -> int:
    from k2sys.pipelines import registry

    cfg = _load_recipe(args.recipe, args.set)
    registry.run(cfg)
    return 0


def _cmd_sft(args: argparse.Namespace) -> int:
    import logging

    from k2sys.coordinator.driver import RecipeRunner

    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s", datefmt="%H:%M:%S")
    cfg = _load_recipe(args.recipe, args.set)
    if getattr(cfg, "pipeline", None) != "sft-rl":
        raise ConfigError(f"sft: recipe {args.recipe!r} has no SFT stage; use an SFT->RL recipe such as tiny-k2")
    out = RecipeRunner(cfg).run_sft()
    print(f"SFT checkpoint (HF format): {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="k2sys", description="Kimi-K2 post-training system")
    sub = p.add_subparsers(dest="command", required=True)

    e = sub.add_parser("env", help="versions, built extensions, usable backends")
    e.add_argument("--json", action="store_true", help="print JSON instead of a table")
    e.set_defaults(fn=_cmd_env)

    c = sub.add_parser("config", help="list recipes or show a recipe's resolved config")
    c.add_argument("action", choices=["show", "list"])
    c.add_argument("recipe", nargs="?")
    c.add_argument("--set", action="extend", nargs="+", default=[], metavar="KEY=VALUE", help="overrides, e.g. --set model.seed=3 rl.iterations=5 (repeatable)")
    c.set_defaults(fn=_cmd_config)

    r = sub.add_parser("run", help="run a recipe end to end")
    r.add_argument("recipe")
    r.add_argument("--set", action="extend", nargs="+", default=[], metavar="KEY=VALUE")
    r.set_defaults(fn=_cmd_run)

    f = sub.add_parser("sft", help="data + SFT stage of a recipe (runs on every rank under torchrun)")
    f.add_argument("recipe")
    f.add_argument("--set", action="extend", nargs="+", default=[], metavar="KEY=VALUE")
    f.set_defaults(fn=_cmd_sft)

    for name, text in (
        ("serve", "serve a checkpoint with the native engine (SGLang-compatible HTTP API)"),
        ("convert", "hf-to-megatron SRC DST --tp N --ep M [--spec auto|local|te] | "
                    "megatron-to-hf SRC DST [--format F]"),
        ("kernels", "compile --arch 90 --json OUT | nvcc --arch 80 90 --json OUT: GPU-readiness checks on a CPU"),
    ):
        sub.add_parser(name, help=text, add_help=False)  # listed in --help; dispatched in main()
    return p


PASSTHROUGH = {"serve": "k2sys.engine.server", "convert": "k2sys.trainer.convert", "kernels": "k2sys.kernels.cli"}


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    if argv and argv[0] in PASSTHROUGH:  # these own their flags (incl. --help)
        import importlib

        return int(importlib.import_module(PASSTHROUGH[argv[0]]).main(argv[1:]) or 0)
    args = build_parser().parse_args(argv)
    try:
        return args.fn(args)
    except ConfigError as e:
        print(f"k2sys: config error: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
