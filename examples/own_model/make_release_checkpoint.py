"""Build a tiny checkpoint in the DeepSeek-V3 / Kimi-K2 release format, a prompt file and a reward,
so `k2sys run custom` can be tried end to end on a CPU (README: "Post-train your own model").

  python examples/own_model/make_release_checkpoint.py OUT
writes
  OUT/Kimi-K2-tiny/   config.json (model_type kimi_k2, quantization_config fp8 e4m3 block [128, 128]),
                      model-0000i-of-0000n.safetensors + model.safetensors.index.json (FP8 weights with
                      weight_scale_inv), tokenizer files with the chat template
  OUT/prompts.jsonl   RL prompts {"question": ..., "target": ..., "tags": [...]} (two rows malformed on purpose)
  OUT/sft.jsonl       SFT conversations {"messages": [...]} for a short SFT stage first
  OUT/reward.py       score(prompt, response, label, metadata) -> float

The model is random (no pretraining fits in an example), so a short SFT stage on the user's
conversations teaches the task: repeat the number in the prompt, answered half the time as the bare
number and half the time in a sentence. The reward prefers a bare number (1.0 when right, 0.5 when
wrong) over the number in a sentence (0.3): RL must move the policy to the preferred form, which a K2 group sees as reward
variance. Swap in your checkpoint, your prompt file (JSONL, Parquet or a `datasets` directory) and
your reward.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
from pathlib import Path

REWARD = '''"""A user reward: called as score(prompt, response, label, metadata) -> float in [0, 1]."""


def score(prompt, response, label, metadata):
    if "crash" in metadata.get("tags", []):
        raise ValueError("this reward fails on purpose for rows tagged 'crash' (it is reported, not fatal)")
    answer = response.strip()
    if answer.isdigit():  # the preferred form: a bare number (right or not)
        return 1.0 if answer == label else 0.5
    return 0.3 if label in answer else 0.0
'''


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("out")
    p.add_argument("--prompts", type=int, default=160)
    p.add_argument("--sft-rows", type=int, default=600)
    p.add_argument("--seed", type=int, default=0)
    args = p.parse_args()

    from k2sys.models import build_model, k2_tiny, save_hf
    from k2sys.tokenizer import default_corpus, train_tokenizer

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    tok_dir = out / ".tokenizer"
    train_tokenizer(default_corpus(n=1500, seed=args.seed), 1024, tok_dir)
    cfg = dataclasses.replace(k2_tiny(vocab_size=1024), model_type="kimi_k2", torch_dtype="bfloat16")
    model = build_model(cfg, seed=args.seed)
    ckpt = save_hf(model, out / "Kimi-K2-tiny", tokenizer=tok_dir, format="fp8-block128", max_shard_bytes=1 << 20)

    rng = random.Random(args.seed)
    numbers = [rng.randrange(10, 100) for _ in range(args.prompts + args.sft_rows)]
    rows = [{"question": f"Repeat this number: {n}", "target": str(n), "tags": ["crash"] if i % 16 == 5 else []}
            for i, n in enumerate(numbers[: args.prompts])]
    lines = [json.dumps(r) for r in rows]
    lines.insert(3, '{"question": "a row with no target"}')       # bad row: missing the label key
    lines.insert(7, '{"question": "broken json", ')               # bad row: not JSON
    (out / "prompts.jsonl").write_text("\n".join(lines) + "\n")
    sft = []
    for i, n in enumerate(numbers[args.prompts:]):
        answer = str(n) if i % 2 == 0 else f"The number is {n}."
        sft.append({"messages": [{"role": "user", "content": f"Repeat this number: {n}"},
                                 {"role": "assistant", "content": answer}]})
    (out / "sft.jsonl").write_text("".join(json.dumps(r) + "\n" for r in sft))
    (out / "reward.py").write_text(REWARD)
    print(f"checkpoint {ckpt}\nprompts    {out / 'prompts.jsonl'}\nsft data   {out / 'sft.jsonl'}\n"
          f"reward     {out / 'reward.py'}:score")


if __name__ == "__main__":
    main()
