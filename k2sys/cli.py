"""The `k2sys` command: the only argument parser in the project.

Subcommands are listed only once they work; each dispatches to a module-level main().
"""

from __future__ import annotations

import argparse
import json
import os
import sys

from k2sys import console
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
    cfg = _load_recipe(args.recipe, args.set)  # a bad value fails here, before the pipelines' imports
    from k2sys.pipelines import registry

    registry.run(cfg)
    return 0


def _cmd_sft(args: argparse.Namespace) -> int:
    cfg = _load_recipe(args.recipe, args.set)  # a bad value fails here, before the trainer's imports
    if getattr(cfg, "pipeline", None) != "sft-rl":
        raise ConfigError(f"sft: recipe {args.recipe!r} has no SFT stage; use an SFT->RL recipe such as tiny-k2")
    from k2sys.coordinator.driver import RecipeRunner

    out = RecipeRunner(cfg).run_sft()
    print(f"SFT checkpoint (HF format): {out}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="k2sys", description="Kimi-K2 post-training system",
                                epilog="Errors print one line naming the field or file and the fix; --debug (anywhere "
                                       f"on the line) or {DEBUG_ENV}=1 shows the Python traceback instead.")
    p.add_argument("--debug", action="store_true", help=f"show tracebacks of errors (also {DEBUG_ENV}=1)")
    p.add_argument("--verbose", action="store_true",
                   help=f"show third-party INFO logs and warnings (megatron, httpx, ...; also {console.VERBOSE_ENV}=1)")
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
        ("convert", "hf-to-megatron SRC DST --tp N --ep M [--spec auto|local|te] [--overwrite] | "
                    "megatron-to-hf SRC DST [--format F] [--overwrite]"),
        ("kernels", "compile --arch 90 --json OUT | nvcc --arch 80 90 --json OUT: GPU-readiness checks on a CPU"),
        ("synth", "tools|tasks|trajectories --endpoint URL ...: tool-use data synthesis (MCP + simulated tools)"),
        ("eval", "MODEL --suite ADAPTER[:LABEL]=PATH --out OUT | compare ...: benchmark suites (avg@n, pass@k, CIs)"),
    ):
        sub.add_parser(name, help=text, add_help=False)  # listed in --help; dispatched in main()
    return p


PASSTHROUGH = {"serve": "k2sys.engine.api.server", "convert": "k2sys.trainer.convert", "kernels": "k2sys.kernels.cli",
               "eval": "k2sys.eval.cli", "synth": "k2sys.data.synth.cli"}
DEBUG_ENV = "K2SYS_DEBUG"


# ---- errors: one line naming the field/file and the fix; the traceback only on request -----------------
def _own_error_types() -> tuple[type[BaseException], ...]:
    """Errors whose message was written for the user (names the field or file, says the fix): shown whole."""
    types_: list[type[BaseException]] = [ConfigError]
    for mod, name in (("k2sys.data.jsonl", "BadDataError"), ("k2sys.trainer.convert", "ConvertError"),
                      ("k2sys.models.checkpoint", "CheckpointError"), ("k2sys.models.config", "ConfigError"),
                      ("k2sys.kernels.cli", "KernelsCLIError")):
        m = sys.modules.get(mod)  # only what the command imported can have been raised
        if m is not None and isinstance(getattr(m, name, None), type):
            types_.append(getattr(m, name))
    return tuple(types_)


def format_error(exc: BaseException, command: str | None) -> tuple[str, int]:
    """(message for stderr, exit code) of an error that ended a command: 2 for a usage or config
    error, 1 otherwise. Our own error classes keep their whole message (a data error lists its first
    bad rows below the summary line); anything else is cut to its first line plus a pointer to --debug."""
    where = f"k2sys {command}" if command else "k2sys"
    if isinstance(exc, KeyboardInterrupt):
        return f"{where}: interrupted", 130
    if isinstance(exc, MemoryError):
        return f"{where}: error: out of memory; use a smaller model, batch or sequence length", 1
    text = str(exc).strip()
    if isinstance(exc, KeyError) and len(exc.args) == 1:
        text = f"missing key {exc.args[0]!r}"
    own = isinstance(exc, _own_error_types())
    if isinstance(exc, OSError):
        if exc.filename is not None and exc.strerror:
            # "[Errno 2] No such file or directory: 'x'" -> the file first, then what is wrong with it
            text = f"{exc.filename}: {exc.strerror}" + (f" (and {exc.filename2})" if exc.filename2 else "")
        own = True  # the machine's state (a missing file, a full disk), not a bug: the message is enough
    if not text:
        text = type(exc).__name__
    if own:
        kind = "config error" if isinstance(exc, ConfigError) else "error"
        rc = 2 if isinstance(exc, ConfigError) else 1
        return f"{where}: {kind}: {text}", rc
    first = text.splitlines()[0]
    more = " ..." if "\n" in text else ""
    return (f"{where}: error: {type(exc).__name__}: {first}{more} "
            f"(rerun with --debug or {DEBUG_ENV}=1 for the traceback)"), 1


def _flag_value(argv: list[str], *names: str) -> str | None:
    """The value of the last `--name V` / `--name=V` in argv (argparse's rule: the last one wins)."""
    out = None
    for i, a in enumerate(argv):
        for n in names:
            if a == n and i + 1 < len(argv):
                out = argv[i + 1]
            elif a.startswith(n + "="):
                out = a[len(n) + 1:]
    return out


def _preflight_serve(argv: list[str]) -> None:
    """Checks of `k2sys serve` arguments that must fail in a second, not after the model has loaded:
    a --port outside 0..65535 (uvicorn does not reject it until it binds, after the load) and a --model
    that is not a directory (the engine imports take seconds before they notice)."""
    port = _flag_value(argv, "--port")
    if port is not None:
        try:
            ok = 0 <= int(port) <= 65535
        except ValueError:
            ok = True  # not an int: the server's own parser says so
        if not ok:
            raise ConfigError(f"serve --port: {port} is not a TCP port; use 1..65535 (0 picks a free one)")
    model = _flag_value(argv, "--model", "--model-path")
    if model is not None:
        from pathlib import Path

        if not Path(model).is_dir():
            what = "does not exist" if not Path(model).exists() else "is a file"
            raise ConfigError(f"serve --model: {model} {what}; give an HF checkpoint directory (config.json + "
                              "*.safetensors)")
        if not (Path(model) / "config.json").is_file():
            raise ConfigError(f"serve --model: {model} has no config.json; give an HF checkpoint directory")


def _split_debug(argv: list[str]) -> tuple[bool, bool, list[str]]:
    """--debug (tracebacks) and --verbose (third-party logs and warnings), accepted anywhere."""
    flag = "--debug" in argv
    env = os.environ.get(DEBUG_ENV, "").strip().lower() not in ("", "0", "false", "no", "off")
    verbose = console.verbose_requested(argv)
    return flag or env, verbose, [a for a in argv if a not in ("--debug", "--verbose")]


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    debug, verbose, argv = _split_debug(argv)
    command = argv[0] if argv and not argv[0].startswith("-") else None
    if command not in PASSTHROUGH:  # those (k2sys serve) configure their own logging from their flags
        console.setup(verbose)
    elif verbose:
        os.environ[console.VERBOSE_ENV] = "1"
    try:
        if command in PASSTHROUGH:  # these own their flags (incl. --help)
            import importlib

            if command == "serve":
                _preflight_serve(argv[1:])

            return int(importlib.import_module(PASSTHROUGH[command]).main(argv[1:]) or 0)
        args = build_parser().parse_args(argv)  # a usage error exits 2 with argparse's one-line message
        return args.fn(args)
    except SystemExit:
        raise
    except BaseException as exc:  # noqa: BLE001 - the CLI's one place that turns errors into messages
        if debug:
            raise
        message, rc = format_error(exc, command)
        print(message, file=sys.stderr)
        return rc


if __name__ == "__main__":
    sys.exit(main())
