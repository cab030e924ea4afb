"""Re-evaluate a finished recipe run's SFT and final checkpoints on more held-out tasks of one family.

A recipe run evaluates `eval.n_tasks` held-out tasks per family (200 in docs/eval.md's instruction run):
too few to tell a 4-5 point change from noise. This draws N held-out tasks from the run's own generator
(its config's family parameters, seed + 1, split "heldout": the run's held-out tasks are the first
tasks.n_heldout of them), drops any prompt that is in the run's train split, and evaluates
<run>/sft_hf and <run>/final_hf greedily through the native engine and the eval harness, with the
run's eval settings and the family's rl.budgets cap. Compare the two with `k2sys eval compare`:

    python scripts/eval_run_heldout.py /tmp/if-run2 --family instruction --n 1000 --out /tmp/if-big2
    k2sys eval compare /tmp/if-big2/sft /tmp/if-big2/rl --names sft rl --out /tmp/if-big2/report.md
"""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run", type=Path, help="a finished recipe run directory (config.json, data/, sft_hf, final_hf)")
    ap.add_argument("--family", required=True, help="a task family of the run, e.g. instruction")
    ap.add_argument("--n", type=int, default=1000, help="held-out tasks to draw (before removing train overlap)")
    ap.add_argument("--out", type=Path, required=True, help="writes <out>/sft and <out>/rl (results.json, samples.jsonl)")
    ap.add_argument("--threads", type=int, default=1, help="torch threads of the in-process engine")
    a = ap.parse_args(argv)

    import torch

    from k2sys.engine.core.config import EngineConfig
    from k2sys.engine.core.engine import NativeEngine
    from k2sys.eval import evaluate_heldout
    from k2sys.eval.harness import EvalConfig
    from k2sys.tasks.base import get_family
    from k2sys.tokenizer import load_tokenizer

    run = a.run
    missing = [p for p in ("config.json", "data/train.json", "data/tokenizer", "sft_hf", "final_hf") if not (run / p).exists()]
    if missing:
        sys.exit(f"{run}: not a finished recipe run (missing {', '.join(missing)}); run `k2sys run` to the end first")
    cfg = json.loads((run / "config.json").read_text())
    if a.family not in cfg["tasks"]["families"]:
        sys.exit(f"--family {a.family!r}: the run's families are {cfg['tasks']['families']}")
    if a.n < 1:
        sys.exit("--n: must be >= 1")
    fam = get_family(a.family, **cfg["tasks"]["params"].get(a.family, {}))
    train = {t["prompt"] for t in json.loads((run / "data" / "train.json").read_text()).get(a.family, [])}
    drawn = fam.generate(a.n, seed=cfg["seed"] + 1, split="heldout")
    tasks = [t for t in drawn if t.prompt not in train]
    print(f"{a.family}: {len(tasks)} held-out tasks ({len(drawn) - len(tasks)} dropped: in the train split)")
    tok = load_tokenizer(run / "data" / "tokenizer")
    torch.set_num_threads(a.threads)
    ecfg = EvalConfig(**{**cfg["eval"], "n_tasks": len(tasks)})
    for tag, ckpt in (("sft", run / "sft_hf"), ("rl", run / "final_hf")):
        engine = NativeEngine.from_pretrained(ckpt, EngineConfig(device="cpu", max_running_requests=256))
        try:
            evaluate_heldout(engine, tok, {a.family: (fam, tasks)}, {}, ecfg, budgets=cfg["rl"]["budgets"],
                             out_dir=a.out / tag, model=f"{run.name}/{tag}", log=print)
        finally:
            engine.shutdown()
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
