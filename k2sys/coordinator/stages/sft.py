"""SFT stage: train on <run>/data/sft.jsonl with checkpoints committed together with the step and the
data cursor (kill -9 at any point resumes without repeating a batch), then export the HF checkpoint
the engine serves."""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from k2sys.console import Progress
from k2sys.coordinator import state as sm
from k2sys.coordinator.stages import RecipeRunner, barrier
from k2sys.models import build_model, preset, save_hf

log = logging.getLogger("k2sys.coordinator")


def train_sft(run: RecipeRunner) -> Path:
    from k2sys.data import Cursor, SFTDataConfig, load_sft_data

    out = run.dir / "sft_hf"
    if run.model_path is not None and (run.cfg.sft.steps == 0 or not run.cfg.data.sft):
        return run.model_path  # no SFT stage: RL starts from the user's checkpoint as it is
    if run.state.get("sft_done"):
        return out
    init = run.model_path or run.dir / "init_hf"
    if run.rank == 0 and not init.exists():
        mcfg = preset(run.cfg.model.preset, vocab_size=run.cfg.model.vocab_size or run.tok.get_vocab_size())
        save_hf(build_model(mcfg, seed=run.cfg.model.seed), init, tokenizer=run.dir / "data" / "tokenizer")
    barrier()
    s = run.cfg.sft
    data = load_sft_data(SFTDataConfig(path=str(run.dir / "data" / "sft.jsonl"), seq_len=s.seq_len,
                                       rows_per_batch=s.rows_per_batch, pack=True,
                                       max_bad_fraction=run.cfg.data.max_bad_fraction), tokenizer=run.tok)
    ckpts = run.sft_ckpts
    committed = ckpts.read()  # the one resume point: checkpoint, step and data cursor together
    if committed is not None:
        resume_dir, cursor, step = ckpts.root / committed["checkpoint"], Cursor.from_dict(committed["cursor"]), \
            committed["step"]
    elif (ckpts.root / "k2sys_megatron.json").exists() and "sft_cursor" in run.state:  # a run from before
        resume_dir, cursor, step = ckpts.root, Cursor.from_dict(run.state["sft_cursor"]), run.state["sft_step"]
    else:
        resume_dir, cursor, step = None, Cursor(), 0
    trainer = run.make_trainer(s.optimizer, s.lr, checkpoint=resume_dir, hf=init)
    progress = Progress("SFT", s.steps, "step", start=step, logger=log) if run.rank == 0 else None
    for batch, nxt in data.train_batches(cursor):
        if step >= s.steps:
            break
        res = trainer.train_step(batch)
        step += 1
        ntok = float(batch["loss_mask"].sum())
        run.metrics.log("sft", step, loss=res.loss, grad_norm=res.grad_norm, tokens_per_s=ntok / res.seconds)
        sm.fault_point("sft_step")  # TEST HOOK (K2SYS_FAULT)
        if step % s.checkpoint_every == 0 or step == s.steps:
            trainer.save(ckpts.dir_for(step))
            if run.rank == 0:
                ckpts.commit(step, cursor=nxt.to_dict(), trainer_step=trainer.step)
            run.save_state(sft_step=step, sft_cursor=nxt.to_dict())
        if progress is not None:
            progress.update(step, loss=res.loss, grad_norm=res.grad_norm)
    if progress is not None:
        progress.close()
    eval_loss = heldout_loss(trainer, data)
    run.metrics.log("sft", step, eval_loss=eval_loss)
    trainer.save_hf(out, extras_from=run.tok_dir)  # tokenizer files travel with the checkpoint the engine serves
    run.save_state(sft_done=True, sft_eval_loss=eval_loss, sft_trainer_step=trainer.step)
    barrier()
    return out


@torch.no_grad()
def heldout_loss(trainer, data) -> float:
    tot, n = 0.0, 0.0
    for batch in data.eval_batches():
        lp = trainer.logprobs(batch)
        m = batch["loss_mask"].float()
        tot += float(-(lp * m).sum())
        n += float(m.sum())
    return tot / max(n, 1.0)
