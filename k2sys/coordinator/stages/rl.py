"""RL stage: the trainer group resumed from the committed iteration, then RLLoop.iteration per
iteration on rank 0 (k2sys.coordinator.rl_loop); the other ranks mirror rank 0's trainer calls."""

from __future__ import annotations

import logging
from pathlib import Path

from k2sys.ckpt import UpdateConfig
from k2sys.console import Progress
from k2sys.coordinator.rl_loop import RLLoop
from k2sys.coordinator.stages import RecipeRunner
from k2sys.coordinator.trainer_group import TrainerGroup, broadcast_value
from k2sys.rewards import gym as reward_gym
from k2sys.rl import RolloutBuffer
from k2sys.tasks import Task

log = logging.getLogger("k2sys.coordinator")


def train_rl(run: RecipeRunner, prompts: list[Task]) -> None:
    """Every rank: the RL trainer (resumed from the committed iteration). Rank 0 runs the loop
    (k2sys.coordinator.rl_loop); the other ranks mirror its trainer calls."""
    r = run.cfg.rl
    ckpts = run.rl_ckpts
    resume: tuple[int, str | None] = (0, None)
    if run.rank == 0:
        committed = ckpts.read()  # the one resume point: iteration, trainer checkpoint and buffer together
        if committed is not None:
            resume = (committed["step"], str(ckpts.root / committed["checkpoint"]))
        elif (ckpts.root / "k2sys_megatron.json").exists() and run.state.get("rl_iter", 0) > 0:
            resume = (run.state["rl_iter"], str(ckpts.root))  # a run from before the pointer file
    it, resume_dir = broadcast_value(resume, run.rank, run.world)
    run.trainer = run.make_trainer(r.optimizer, r.lr, checkpoint=resume_dir, hf=run.sft_hf)
    # every rank pushes its shards through the one push path; rank 0 owns the engine's sink
    run.tg = TrainerGroup(run.trainer, run.rank, run.world,
                          sink=(lambda: run.engine.sink) if run.rank == 0 else None,
                          update_config=UpdateConfig(bucket_bytes=run.cfg.engine.update_bucket_mb << 20))
    if run.rank != 0:
        run.tg.follow()  # mirror rank 0's trainer calls until it says stop
        return
    buf_file = None  # the partial rollouts committed with the checkpoint (legacy runs: beside state.json)
    if resume_dir is not None:
        buf_file = run.dir / "rollout_buffer.json" if Path(resume_dir) == ckpts.root \
            else Path(resume_dir) / "rollout_buffer.json"
    buffer = RolloutBuffer.load(buf_file, max_age=run.cfg.rollout.max_age) if buf_file and buf_file.exists() \
        else RolloutBuffer(None, max_age=run.cfg.rollout.max_age)
    # reward state across iterations (safety attack set, critic), as of the committed iteration
    reward_gym.bind_reward_state(run.families, run.dir / "rewards", it)
    if it > 0:  # the engine serves the SFT checkpoint: bring it to the resumed trainer's weights
        run.tg.call("push", str(it))
    loop = RLLoop(run, prompts, it, buffer)
    loop.offload()
    progress = Progress("RL", r.iterations, "iter", start=it, logger=log)
    for it in range(it, r.iterations):
        rec = loop.iteration(it)
        progress.update(it + 1, reward=float(rec["reward_mean"]), loss=rec.get("loss"),
                        paused=rec["paused_requests"])
    progress.close()
    loop.machine.do("continue", run.engine.client.continue_generation)  # engine serves the final eval
