"""The SFT -> RL recipe driver: data -> SFT -> eval -> RL (colocated, partial rollouts) -> eval -> report.

Every stage is resumable: state.json (atomic) records what is done; an SFT or RL checkpoint and
its counters (SFT step + data cursor; RL iteration + trainer step + partial-rollout buffer) are
committed together by one pointer file (state.CommittedCheckpoints: <stage>_ckpt/step_N/ and
latest.json), so `kill -9` at any instant and a rerun of the same command continue from the last
committed step, without losing or repeating an iteration. A resumed run drops the metrics records of
uncommitted work, reaps what the dead coordinator left running (engine_handle.claim_run) and adds a
segment to state.json: report.json's total_s is the sum over all segments.

The stages are methods here (stage_data, stage_sft, run_eval, difficulty_filter, stage_rl); one RL
iteration, the paper's loop (section 5), is k2sys.coordinator.rl_loop.RLLoop.iteration.
"""

from __future__ import annotations

import json
import logging
import os
import random
import threading
import time
from pathlib import Path
from typing import Any

import torch

from k2sys.ckpt import UpdateConfig
from k2sys.config import ConfigError, render, to_dict
from k2sys.console import Progress
from k2sys.coordinator import state as sm
from k2sys.coordinator.engine_handle import EngineHandle, RunClaim, claim_run
from k2sys.coordinator.metrics import MetricsLog
from k2sys.coordinator.rl_loop import RLLoop
from k2sys.coordinator.trainer_group import TrainerGroup, broadcast_value
from k2sys.engine.api.client import EngineHTTPError
from k2sys.engine.launch import LaunchError
from k2sys.engine.api.protocol import GenerateRequest, SamplingParams
from k2sys.eval import evaluate_heldout, recipe_summary
from k2sys.models import build_model, preset, save_hf
from k2sys.models.hf_io import write_json_atomic
from k2sys.rewards import gym as reward_gym
from k2sys.rl import DifficultyFilter, RolloutBuffer
from k2sys.tasks import Task, get_family
from k2sys.tasks.format import prompt_ids, score_many, sft_rows, stop_token_ids
from k2sys.tokenizer import render_chat, tokenize_chat

log = logging.getLogger("k2sys.coordinator")
ENGINE_ERRORS = (EngineHTTPError, LaunchError, ConnectionError, TimeoutError)


class RecipeRunner:
    def __init__(self, cfg: Any):
        self.cfg = cfg
        if not torch.cuda.is_available():
            torch.set_num_threads(cfg.cpu_threads)
        self.dir = Path(cfg.output_root) / cfg.name
        # Under torchrun every rank runs the SFT stage (the trainer is collective); rank 0 alone
        # writes run files. RL runs with one trainer rank: the coordinator is that rank.
        self.rank, self.world = _init_ranks()
        self.claim: RunClaim | None = None
        self.sft_ckpts = sm.CommittedCheckpoints(self.dir / "sft_ckpt")
        self.rl_ckpts = sm.CommittedCheckpoints(self.dir / "rl_ckpt")
        self.state_path = self.dir / "state.json"
        pruned: list[str] = []
        if self.rank == 0:
            self.dir.mkdir(parents=True, exist_ok=True)
            (self.dir / "logs").mkdir(exist_ok=True)
            self.claim = claim_run(self.dir)  # one coordinator per run dir; reaps a dead one's processes
            # checkpoints written but never committed (kill -9 between save and commit, or mid-write) go
            pruned = self.sft_ckpts.prune() + self.rl_ckpts.prune()
        _barrier()
        self.state: dict = json.loads(self.state_path.read_text()) if self.state_path.exists() else {}
        saved = self.dir / "config.json"
        if saved.exists() and self.state and _comparable(json.loads(saved.read_text())) != _comparable(to_dict(cfg)):
            raise RuntimeError(f"{saved} holds a different config than this command: resuming would mix runs; "
                               f"use another run name (--set name=...) or delete {self.dir}")
        if self.rank == 0:
            # replaced atomically: the other ranks of a resumed job read it at the same time
            tmp = saved.with_name(f".{saved.name}.tmp")
            tmp.write_text(render(cfg) + "\n")
            os.replace(tmp, saved)
        self.metrics = MetricsLog(self.dir) if self.rank == 0 else NullMetrics()
        self._segment: dict | None = None
        self._heartbeat: _Heartbeat | None = None
        if self.rank == 0:
            self._begin_segment(pruned)
        self.families = {f: get_family(f, **cfg.tasks.params.get(f, {})) for f in cfg.tasks.families}
        if cfg.data.rl_prompts:  # the user's prompts, scored by the user's reward (k2sys.tasks.user)
            from k2sys.rewards.registry import make_reward
            from k2sys.tasks.user import UserPrompts

            self.families[UserPrompts.name] = UserPrompts(make_reward(cfg.reward, **cfg.reward_options), cfg.reward)
        self.model_path = Path(cfg.model.path) if cfg.model.path else None
        self.tok_dir = self.model_path or self.dir / "data" / "tokenizer"
        self.engine: EngineHandle | None = None
        self.trainer = None

    # ---- bookkeeping ---------------------------------------------------------------------------
    def save_state(self, **updates: Any) -> None:
        self.state.update(updates)
        if self.rank == 0:
            if self._segment is not None:
                self._segment["end"] = time.time()
            write_json_atomic(self.state_path, self.state)

    def _begin_segment(self, pruned: list[str]) -> None:
        """Rank 0, at start: close the segment of a coordinator that died (its end: the last sign of
        life it left), drop the metrics of uncommitted work, open this process's segment."""
        segs = self.state.setdefault("segments", [])
        resumed = bool(segs) or self.state_path.exists()
        if segs and segs[-1].get("outcome") == "running":
            last = segs[-1]
            signs = [last.get("end", last["start"])] + [
                p.stat().st_mtime for p in (self.dir / _Heartbeat.NAME, self.metrics.path) if p.exists()]
            last["end"] = max(t for t in signs if t >= last["start"])
            last["outcome"] = "killed"
        sft = self.sft_ckpts.read()
        rl = self.rl_ckpts.read()
        # the pointers are the truth; state.json may lag by one commit (a kill between the two writes)
        if rl is not None:
            self.state.update(rl_iter=rl["step"], rl_trainer_step=rl.get("trainer_step"))
        if sft is not None and not self.state.get("sft_done"):
            self.state.update(sft_step=sft["step"], sft_cursor=sft["cursor"])
        dropped = self.metrics.keep_only(self._committed_record(sft, rl)) if resumed else 0
        self._segment = {"start": _process_start_time(), "end": time.time(), "pid": os.getpid(), "outcome": "running"}
        segs.append(self._segment)
        self.save_state()
        self._heartbeat = _Heartbeat(self.dir)
        if resumed:
            reaped = self.claim.reaped if self.claim else []
            self.metrics.log("resume", len(segs) - 1, rl_iter=self.state.get("rl_iter", 0),
                             sft_step=self.state.get("sft_step", 0), dropped_records=dropped,
                             pruned_checkpoints=len(pruned), reaped_processes=len(reaped))
            log.info("resuming run %s (segment %d): RL iteration %d, SFT step %d; dropped %d uncommitted metrics "
                     "records, %d uncommitted checkpoint dirs, reaped %d leftover processes", self.dir, len(segs),
                     self.state.get("rl_iter", 0), self.state.get("sft_step", 0), dropped, len(pruned), len(reaped))

    def _committed_record(self, sft: dict | None, rl: dict | None):
        """keep(record) for metrics.jsonl: False for records of work the checkpoints do not hold (it is redone)."""
        rl_it = rl["step"] if rl else 0
        sft_done, sft_step = bool(self.state.get("sft_done")), (sft["step"] if sft else 0)
        evals = set(self.state.get("eval", {}))
        data_done, filtered = bool(self.state.get("data_done")), (self.dir / "data" / "rl_prompts.json").exists()

        def keep(r: dict) -> bool:
            kind, step = r.get("kind"), r.get("step", 0)
            if kind in ("rl", "switch"):
                return step <= rl_it
            if kind == "sft":
                return sft_done or (step <= sft_step and "eval_loss" not in r)
            if kind == "eval":
                return all(k.split("/", 1)[0] in evals for k in r if k.endswith("/accuracy"))
            if kind == "data":
                return data_done
            if kind == "filter":
                return filtered
            return True
        return keep

    def _end_segment(self, outcome: str) -> None:
        if self._segment is None:
            return
        if self._heartbeat is not None:
            self._heartbeat.stop()
        self._segment["outcome"] = outcome
        segs = self.state["segments"]
        self.save_state(total_s=sum(sg["end"] - sg["start"] for sg in segs))
        self._segment = None
        if self.claim is not None:
            self.claim.release()

    def tasks(self, split: str) -> dict[str, list[Task]]:
        path = self.dir / "data" / f"{split}.json"
        return {f: [Task.from_dict(d) for d in rows] for f, rows in json.loads(path.read_text()).items()}

    # ---- stages ------------------------------------------------------------------------------
    def stage_data(self) -> None:
        from k2sys.data import write_chat_jsonl
        from k2sys.tokenizer import default_corpus, load_tokenizer, train_tokenizer

        data = self.dir / "data"
        if self.state.get("data_done") or self.rank != 0:
            _barrier()  # pairs with rank 0's barrier after it built the data (or found it built)
            self.tok = load_tokenizer(self.tok_dir)
            return
        data.mkdir(exist_ok=True)
        env_rows = self._env_sft_rows()
        if self.model_path is None:
            # Environment conversations join the tokenizer corpus: tool JSON, code and chat structure
            # then cost a few tokens each instead of one per character.
            corpus = default_corpus() + [render_chat(r["messages"], r.get("tools"))
                                         for rows in env_rows.values() for r in rows[:1000]]
            train_tokenizer(corpus, self.cfg.tokenizer.vocab_size, self.tok_dir)
        self.tok = load_tokenizer(self.tok_dir)  # a checkpoint's own tokenizer and chat template when model.path
        c = self.cfg.tasks
        splits = {}
        user = self._user_tasks()
        for split, n, seed in (("train", c.n_train, self.cfg.seed), ("heldout", c.n_heldout, self.cfg.seed + 1)):
            splits[split] = {}
            for name, fam in self.families.items():
                tasks = user[split] if name == "user" else _generate_upto(fam, n, seed, split)
                splits[split][name] = [t.to_dict() for t in tasks]
            write_json_atomic(data / f"{split}.json", splits[split])
        rows = []
        for name, fam in self.families.items():
            if name != "user":
                rows += sft_rows(fam, [Task.from_dict(d) for d in splits["train"][name]])
        rows += self._user_sft_rows()
        for kind, kind_rows in env_rows.items():
            fit = [r for r in kind_rows
                   if len(tokenize_chat(self.tok, r["messages"], r.get("tools"))[0]) <= self.cfg.sft.seq_len]
            self.metrics.log("data", 0, **{f"{kind}_rows": len(kind_rows), f"{kind}_rows_fit": len(fit)})
            rows += [{**r, "meta": {"family": kind}} for r in fit]
        random.Random(self.cfg.seed).shuffle(rows)
        write_chat_jsonl(data / "sft.jsonl", rows)
        self.save_state(data_done=True)
        _barrier()

    def _user_tasks(self) -> dict[str, list[Task]]:
        """The user's RL prompts (data.rl_prompts), split into train and held-out by a hash of each prompt."""
        d = self.cfg.data
        if not d.rl_prompts:
            return {"train": [], "heldout": []}
        from k2sys.data.sources import load_prompts
        from k2sys.tasks.user import UserPrompts

        records, report = load_prompts(d.rl_prompts, prompt_key=d.prompt_key, label_key=d.label_key,
                                       messages_key=d.messages_key, split=d.split, max_bad_fraction=d.max_bad_fraction)
        self._log_report("rl_prompts", report)
        unique = {r.id: r for r in records}  # duplicated rows count once
        order = sorted(unique)  # content hashes: a deterministic, order-free split
        held = set(order[: min(d.heldout, max(len(order) - 1, 0))])
        train = [unique[i] for i in order if i not in held]
        if not train:
            raise ConfigError(f"data.rl_prompts: {d.rl_prompts} has no usable prompt left for training")
        return {"train": UserPrompts.tasks_from_records(train),
                "heldout": UserPrompts.tasks_from_records([unique[i] for i in order if i in held])}

    def _user_sft_rows(self) -> list[dict]:
        d = self.cfg.data
        if not d.sft:
            return []
        from k2sys.data.sources import load_chat_rows

        rows, report = load_chat_rows(d.sft, messages_key=d.sft_messages_key, split=d.split)
        self._log_report("sft_data", report)
        report.check(d.max_bad_fraction)
        return [r.to_json() for r in rows]

    def _log_report(self, what: str, report: Any) -> None:
        if report.n_bad:
            log.warning("%s: %s", what, report.summary())
        self.metrics.log("data", 0, **{f"{what}_rows": report.n_ok, f"{what}_bad_rows": report.n_bad})
        write_json_atomic(self.dir / "data" / f"{what}_report.json", report.to_dict())

    def _train_dtype(self) -> str | None:
        """trainer.dtype, auto = the checkpoint's dtype on GPU, float32 on CPU (megatron's CPU path)."""
        d = self.cfg.trainer.dtype
        if d != "auto":
            return d
        return None if torch.cuda.is_available() else "float32"

    def _env_sft_rows(self) -> dict[str, list[dict]]:
        """SFT conversations of the train tasks of each environment kind (the tasks RL plays later):
        judged synthetic trajectories for tool use, the reference program for code."""
        c, out = self.cfg.tasks, {}
        if c.tool_use:
            from k2sys.data.synth.pipeline import synthesize_tool_use

            rows, stats, _ = synthesize_tool_use(c.tool_use, self.cfg.seed, failure_rate=c.tool_use_failure_rate)
            log.info("tool-use synthesis: %s", stats.to_dict())
            out["tool_use"] = [{"messages": r["messages"], "tools": r["tools"]} for r in rows]
        if c.code:
            from k2sys.envs.code import code_sft_rows, code_tasks

            out["code"] = code_sft_rows(code_tasks(c.code, self.cfg.seed))
        return out

    def stage_sft(self) -> Path:
        from k2sys.data import Cursor, SFTDataConfig, load_sft_data

        out = self.dir / "sft_hf"
        if self.model_path is not None and (self.cfg.sft.steps == 0 or not self.cfg.data.sft):
            return self.model_path  # no SFT stage: RL starts from the user's checkpoint as it is
        if self.state.get("sft_done"):
            return out
        init = self.model_path or self.dir / "init_hf"
        if self.rank == 0 and not init.exists():
            mcfg = preset(self.cfg.model.preset, vocab_size=self.cfg.model.vocab_size or self.tok.get_vocab_size())
            save_hf(build_model(mcfg, seed=self.cfg.model.seed), init, tokenizer=self.dir / "data" / "tokenizer")
        _barrier()
        s = self.cfg.sft
        data = load_sft_data(SFTDataConfig(path=str(self.dir / "data" / "sft.jsonl"), seq_len=s.seq_len,
                                           rows_per_batch=s.rows_per_batch, pack=True,
                                           max_bad_fraction=self.cfg.data.max_bad_fraction), tokenizer=self.tok)
        ckpts = self.sft_ckpts
        committed = ckpts.read()  # the one resume point: checkpoint, step and data cursor together
        if committed is not None:
            resume_dir, cursor, step = ckpts.root / committed["checkpoint"], Cursor.from_dict(committed["cursor"]), \
                committed["step"]
        elif (ckpts.root / "k2sys_megatron.json").exists() and "sft_cursor" in self.state:  # a run from before
            resume_dir, cursor, step = ckpts.root, Cursor.from_dict(self.state["sft_cursor"]), self.state["sft_step"]
        else:
            resume_dir, cursor, step = None, Cursor(), 0
        trainer = self._trainer(s.optimizer, s.lr, checkpoint=resume_dir, hf=init)
        progress = Progress("SFT", s.steps, "step", start=step, logger=log) if self.rank == 0 else None
        for batch, nxt in data.train_batches(cursor):
            if step >= s.steps:
                break
            res = trainer.train_step(batch)
            step += 1
            ntok = float(batch["loss_mask"].sum())
            self.metrics.log("sft", step, loss=res.loss, grad_norm=res.grad_norm, tokens_per_s=ntok / res.seconds)
            sm.fault_point("sft_step")  # TEST HOOK (K2SYS_FAULT)
            if step % s.checkpoint_every == 0 or step == s.steps:
                trainer.save(ckpts.dir_for(step))
                if self.rank == 0:
                    ckpts.commit(step, cursor=nxt.to_dict(), trainer_step=trainer.step)
                self.save_state(sft_step=step, sft_cursor=nxt.to_dict())
            if progress is not None:
                progress.update(step, loss=res.loss, grad_norm=res.grad_norm)
        if progress is not None:
            progress.close()
        eval_loss = _eval_loss(trainer, data)
        self.metrics.log("sft", step, eval_loss=eval_loss)
        trainer.save_hf(out, extras_from=self.tok_dir)  # tokenizer files travel with the checkpoint the engine serves
        self.save_state(sft_done=True, sft_eval_loss=eval_loss, sft_trainer_step=trainer.step)
        _barrier()
        return out

    def _parallel(self):
        from k2sys.trainer.parallel import ParallelConfig

        return ParallelConfig(tp=self.cfg.trainer.tp, ep=self.cfg.trainer.ep)

    def run_sft(self) -> Path:
        """data -> SFT -> HF export, on every rank of a torchrun job (`k2sys sft`)."""
        outcome = "failed"
        try:
            self.stage_data()
            out = self.stage_sft()
            outcome = "completed"
            return out
        finally:
            self._end_segment(outcome)
            self.metrics.close()

    def run_eval(self, tag: str) -> dict:
        """Held-out families and env kinds through the eval harness (k2sys.eval.harness): results.json and
        samples.jsonl in <run>/eval/<tag>/ (`k2sys eval compare` reads them), the per-family summary in
        state.json and as eval/<tag>/<family>/<metric> records."""
        if tag in self.state.get("eval", {}):
            return self.state["eval"][tag]
        heldout = self.tasks("heldout")
        fams = {f: (self.families[f], heldout[f]) for f in self.families}
        envs = {kind: self.cfg.tasks.env_specs(kind, "heldout", self.cfg.seed) for kind in self.cfg.tasks.env_kinds()}
        results = self.engine_call(lambda: evaluate_heldout(
            self.engine.client, self.tok, fams, envs, self.cfg.eval, agent=self.cfg.agent, budgets=self.cfg.rl.budgets,
            out_dir=self.dir / "eval" / tag, model=f"{self.cfg.name}/{tag}", log=log.info))
        rep = recipe_summary(results)
        k = results["sampling"]["n"]
        shown = ["accuracy"] + ([f"avg@{k}", f"pass@{k}"] if k > 1 else []) + ["prompt_strict", "inst_strict"]
        for f, r in rep.items():  # logged before the commit: a resume drops the records of an uncommitted eval
            self.metrics.log("eval", self.state.get("rl_iter", 0),
                             **{f"{tag}/{f}/{m}": r[m] for m in shown if m in r})
        sm.fault_point("eval")  # TEST HOOK (K2SYS_FAULT): results and metrics written, eval not committed
        self.save_state(eval={**self.state.get("eval", {}), tag: rep})
        log.info("eval %s: %s", tag, {f: round(r["accuracy"], 3) for f, r in rep.items()})
        return rep

    def difficulty_filter(self) -> list[Task]:
        path = self.dir / "data" / "rl_prompts.json"
        if path.exists():
            return [Task.from_dict(d) for d in json.loads(path.read_text())]
        r = self.cfg.rl
        flt = DifficultyFilter(k=r.filter_k, low=r.filter_low, high=r.filter_high)
        train = self.tasks("train")
        rng = random.Random(self.cfg.seed + 2)
        pool = [t for f in self.families for t in train[f]]
        if r.filter_prompts == 0:  # no filter: every train prompt is used
            write_json_atomic(path, [t.to_dict() for t in pool])
            return pool
        rng.shuffle(pool)
        pool = pool[: r.filter_prompts]
        # a judged family (critic-scored) has no solved sample: its prompts pass unfiltered
        judged = [t for t in pool if not self.families[t.family].verifiable]
        pool = [t for t in pool if self.families[t.family].verifiable]
        if not pool:
            write_json_atomic(path, [t.to_dict() for t in judged])
            return judged
        stops = stop_token_ids(self.tok)
        n = r.filter_samples
        reqs = [GenerateRequest(input_ids=tuple(prompt_ids(self.tok, t)),
                                sampling=SamplingParams(temperature=r.t_start, max_new_tokens=r.budgets[t.family],
                                                        stop_token_ids=tuple(stops), n=n, seed=i))
                for i, t in enumerate(pool)]
        outs = self.engine_call(lambda: self.engine.client.generate(reqs))
        rewards = score_many([(self.families[t.family], t, o.output_ids, o.finish_reason)
                              for i, t in enumerate(pool) for o in outs[i * n:(i + 1) * n]], self.tok, stops)
        correct = [sum(r >= 1.0 for r in rewards[i * n:(i + 1) * n]) for i in range(len(pool))]
        res = flt([n] * len(pool), correct)
        kept = [pool[i] for i in res.keep] + judged
        write_json_atomic(path, [t.to_dict() for t in kept])
        self.metrics.log("filter", 0, **res.stats(), **{"filter/judged_unfiltered": len(judged)})
        if not kept:
            raise RuntimeError("difficulty filter kept no prompt: widen rl.filter_low/filter_high")
        return kept

    # ---- RL ----------------------------------------------------------------------------------
    def stage_rl(self, prompts: list[Task]) -> None:
        """Every rank: the RL trainer (resumed from the committed iteration). Rank 0 runs the loop
        (k2sys.coordinator.rl_loop); the other ranks mirror its trainer calls."""
        r = self.cfg.rl
        ckpts = self.rl_ckpts
        resume: tuple[int, str | None] = (0, None)
        if self.rank == 0:
            committed = ckpts.read()  # the one resume point: iteration, trainer checkpoint and buffer together
            if committed is not None:
                resume = (committed["step"], str(ckpts.root / committed["checkpoint"]))
            elif (ckpts.root / "k2sys_megatron.json").exists() and self.state.get("rl_iter", 0) > 0:
                resume = (self.state["rl_iter"], str(ckpts.root))  # a run from before the pointer file
        it, resume_dir = broadcast_value(resume, self.rank, self.world)
        self.trainer = self._trainer(r.optimizer, r.lr, checkpoint=resume_dir, hf=self.sft_hf)
        # every rank pushes its shards through the one push path; rank 0 owns the engine's sink
        self.tg = TrainerGroup(self.trainer, self.rank, self.world,
                               sink=(lambda: self.engine.sink) if self.rank == 0 else None,
                               update_config=UpdateConfig(bucket_bytes=self.cfg.engine.update_bucket_mb << 20))
        if self.rank != 0:
            self.tg.follow()  # mirror rank 0's trainer calls until it says stop
            return
        buf_file = None  # the partial rollouts committed with the checkpoint (legacy runs: beside state.json)
        if resume_dir is not None:
            buf_file = self.dir / "rollout_buffer.json" if Path(resume_dir) == ckpts.root \
                else Path(resume_dir) / "rollout_buffer.json"
        buffer = RolloutBuffer.load(buf_file, max_age=self.cfg.rollout.max_age) if buf_file and buf_file.exists() \
            else RolloutBuffer(None, max_age=self.cfg.rollout.max_age)
        # reward state across iterations (safety attack set, critic), as of the committed iteration
        reward_gym.bind_reward_state(self.families, self.dir / "rewards", it)
        if it > 0:  # the engine serves the SFT checkpoint: bring it to the resumed trainer's weights
            self.tg.call("push", str(it))
        loop = RLLoop(self, prompts, it, buffer)
        loop.offload()
        progress = Progress("RL", r.iterations, "iter", start=it, logger=log)
        for it in range(it, r.iterations):
            rec = loop.iteration(it)
            progress.update(it + 1, reward=float(rec["reward_mean"]), loss=rec.get("loss"),
                            paused=rec["paused_requests"])
        progress.close()
        loop.machine.do("continue", self.engine.client.continue_generation)  # engine serves the final eval

    def _trainer(self, optimizer: str, lr: float, *, checkpoint: str | os.PathLike | None, hf: Path):
        """A Megatron trainer resumed from `checkpoint` (MegatronBackend.save) or started from HF weights."""
        from k2sys.trainer.backend import MegatronBackend, TrainerConfig
        from k2sys.trainer.optim import OptimConfig

        tcfg = TrainerConfig(optim=OptimConfig(name=optimizer, lr=lr), moe_kernels=self.cfg.trainer.moe_kernels,
                             dtype=self._train_dtype())
        if checkpoint is not None:
            return MegatronBackend.from_checkpoint(checkpoint, self._parallel(), train=tcfg)
        return MegatronBackend.from_hf(hf, self._parallel(), train=tcfg)

    def engine_call(self, fn, *, what: str = "engine call", on_restart=None):
        """fn() against the engine; if the engine died meanwhile, restart it (with the trainer's weights
        once a trainer exists), run on_restart() and call again, up to engine.restarts times."""
        for attempt in range(self.cfg.engine.restarts + 1):
            try:
                return fn()
            except ENGINE_ERRORS as e:
                if self.engine.alive():
                    raise
                log.error("engine died during %s (attempt %d): %s%s; restarting it", what, attempt + 1, e,
                          "".join(f" ({n})" for n in getattr(e, "__notes__", ())))
                self.ensure_engine()
                if on_restart is not None:
                    on_restart()
        raise RuntimeError(f"{what} failed {self.cfg.engine.restarts + 1} times")

    def ensure_engine(self) -> None:
        """A dead engine restarted: before RL on the served checkpoint, during RL from the offloaded
        trainer's host copy (which holds the current weights)."""
        if self.engine.alive():
            return
        if self.trainer is None:
            self.engine.restart(self._model_config, self._model_dtype)
            self.metrics.log("fault", 0, engine_restarted=1)
            return
        self.engine.restart(self.trainer.config, self.trainer.dtype)
        self.tg.call("push", str(self.state.get("rl_iter", 0)))
        self.metrics.log("fault", self.state.get("rl_iter", 0), engine_restarted=1)

    # ---- the whole recipe ----------------------------------------------------------------------
    def _follow(self) -> dict:
        """Ranks > 0 of a torchrun job: the SFT stage, then mirror rank 0's RL trainer calls."""
        self.stage_data()
        self.sft_hf = self.stage_sft()
        self.stage_rl([])
        return {}

    def run(self) -> dict:
        if self.rank != 0:
            return self._follow()
        try:
            report = self._run()
        except BaseException:
            self._end_segment("failed")
            raise
        return report

    def _run(self) -> dict:
        from k2sys.coordinator.report import write_report

        self.stage_data()
        sft_hf = self.sft_hf = self.stage_sft()
        import k2sys.models as models

        mcfg = self._model_config = models.load_config(sft_hf)
        dtype = self._train_dtype() or mcfg.torch_dtype  # the engine computes in the trainer's dtype
        self._model_dtype = torch.float32 if dtype == "float32" else torch.bfloat16
        if self.cfg.tasks.env_kinds() and self.cfg.agent.max_episode_tokens > mcfg.max_position_embeddings:
            raise ConfigError(f"agent.max_episode_tokens={self.cfg.agent.max_episode_tokens} exceeds the model's "
                              f"max_position_embeddings={mcfg.max_position_embeddings}; lower it")
        self.engine = EngineHandle(self.cfg.engine, self.dir, claim=self.claim)
        try:
            self.engine.start(sft_hf, mcfg, self._model_dtype)
            self.run_eval("sft")
            prompts = self.difficulty_filter()
            self.stage_rl(prompts)
            self.run_eval("rl")
        finally:
            self.engine.stop()
            self.metrics.close()
        if self.trainer is not None:
            if not self.state.get("final_exported"):
                if self.trainer.offloaded:
                    self.tg.call("onload")
                self.tg.call("save_hf", self.dir / "final_hf", "native", self.tok_dir)
                self.save_state(final_exported=True)
            self.tg.stop()
        self._end_segment("completed")
        return write_report(self.dir, self.cfg, self.state)


class _Heartbeat:
    """Touches <run>/heartbeat every second: after a kill -9 its mtime says when this segment ended."""

    NAME = "heartbeat"

    def __init__(self, run_dir: Path, period_s: float = 1.0):
        self.path, self.period_s = run_dir / self.NAME, period_s
        self._stop = threading.Event()
        self.path.touch()
        self._thread = threading.Thread(target=self._beat, name="k2sys-heartbeat", daemon=True)
        self._thread.start()

    def _beat(self) -> None:
        while not self._stop.wait(self.period_s):
            try:
                os.utime(self.path)
            except OSError:
                pass

    def stop(self) -> None:
        self._stop.set()


def _process_start_time() -> float:
    """When this process started (wall clock): its segment includes the imports before main()."""
    try:
        import psutil

        return psutil.Process().create_time()
    except Exception:  # noqa: BLE001 - psutil missing or /proc unreadable
        return time.time()


def _comparable(cfg: dict) -> dict:
    """What must not change when a run resumes: everything but the trainer's parallel layout
    (checkpoints load at any TP/EP, so `k2sys sft` on 8 ranks can hand over to a 1-rank RL run)."""
    return {k: v for k, v in cfg.items() if k != "trainer"}


def _init_ranks() -> tuple[int, int]:
    """(rank, world): torch.distributed is set up now when torchrun launched several ranks."""
    import os

    if int(os.environ.get("WORLD_SIZE", "1")) > 1:
        from k2sys.trainer.parallel import init_distributed

        return init_distributed(timeout_s=6 * 3600)  # followers wait through rollouts and evals
    return 0, 1


def _barrier() -> None:
    import torch.distributed as dist

    if dist.is_initialized() and dist.get_world_size() > 1:
        dist.barrier()


class NullMetrics:
    """Non-zero ranks log nothing (rank 0 owns metrics.jsonl)."""

    def log(self, *args: Any, **kwargs: Any) -> None:
        pass

    def close(self) -> None:
        pass


def _generate_upto(fam, n: int, seed: int, split: str) -> list[Task]:
    """fam.generate(n), or as many distinct tasks as the family has (small difficulty settings)."""
    try:
        return fam.generate(n, seed=seed, split=split)
    except ValueError as e:
        import re

        m = re.search(r"found only (\d+) distinct", str(e))
        if not m:
            raise
        return fam.generate(int(m.group(1)), seed=seed, split=split)


@torch.no_grad()
def _eval_loss(trainer, data) -> float:
    tot, n = 0.0, 0.0
    for batch in data.eval_batches():
        lp = trainer.logprobs(batch)
        m = batch["loss_mask"].float()
        tot += float(-(lp * m).sum())
        n += float(m.sum())
    return tot / max(n, 1.0)
