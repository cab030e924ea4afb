"""The recipe's stages, each a function of the run (k2sys.coordinator.driver.RecipeRunner: config, run
directory, state.json, metrics, ranks, engine and trainer handles), composed by RecipeRunner.run:

    data.build_data          tokenizer, task splits, SFT conversations          (every rank; rank 0 writes)
    sft.train_sft            SFT with committed checkpoints, HF export          (every rank)
    evaluate.evaluate        held-out families and envs through k2sys.eval      (rank 0, engine)
    difficulty.difficulty_filter  drop prompts the SFT model always/never solves (rank 0, engine)
    rl.train_rl              the RL trainer and RLLoop (rl_loop.py) per iteration (rank 0 drives, others mirror)

Each stage is resumable on its own: it reads what state.json and the committed checkpoints say is
done and redoes only the rest.
"""

from __future__ import annotations

from typing import Any


def barrier() -> None:
    """All ranks of a torchrun job meet here (no-op in a 1-rank run)."""
    import torch.distributed as dist

    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


RecipeRunner = Any  # the run a stage works on (driver.RecipeRunner; not imported: the driver imports the stages)
