"""The SFT -> RL recipe driver: data -> SFT -> eval -> RL (colocated, partial rollouts) -> eval -> report.

Every stage is resumable: state.json (atomic) records what is done; an SFT or RL checkpoint and
its counters (SFT step + data cursor; RL iteration + trainer step + partial-rollout buffer) are
committed together by one pointer file (state.CommittedCheckpoints: <stage>_ckpt/step_N/ and
latest.json), so `kill -9` at any instant and a rerun of the same command continue from the last
committed step, without losing or repeating an iteration. A resumed run drops the metrics records of
uncommitted work, reaps what the dead coordinator left running (engine_handle.claim_run) and adds a
segment to state.json: report.json's total_s is the sum over all segments.

`RecipeRunner` holds the run (config, run directory, state.json, metrics, ranks, engine and trainer
handles) and composes the stages, one module each in k2sys.coordinator.stages (data, sft, evaluate,
difficulty, rl); one RL iteration, the paper's loop (section 5), is
k2sys.coordinator.rl_loop.RLLoop.iteration.
"""

from __future__ import annotations

import json
import logging
import os
import threading
import time
from pathlib import Path
from typing import Any

import torch

from k2sys.config import ConfigError, from_dict, render, to_dict
from k2sys.coordinator import state as sm
from k2sys.coordinator.engine_handle import EngineHandle, RunClaim, claim_run
from k2sys.coordinator.metrics import MetricsLog
from k2sys.coordinator.stages import barrier, data, difficulty, evaluate, rl, sft
from k2sys.engine.api.client import EngineHTTPError
from k2sys.engine.launch import LaunchError
from k2sys.models.hf_io import write_json_atomic
from k2sys.tasks import Task, get_family

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
        barrier()
        self.state: dict = json.loads(self.state_path.read_text()) if self.state_path.exists() else {}
        saved = self.dir / "config.json"
        # the saved config is read back through the classes, so fields added since it was written compare at
        # their defaults
        if saved.exists() and self.state and _comparable(to_dict(from_dict(type(cfg), json.loads(saved.read_text())))) \
                != _comparable(to_dict(cfg)):
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

    # ---- stages (k2sys.coordinator.stages) -------------------------------------------------------
    def stage_data(self) -> None:
        data.build_data(self)

    def stage_sft(self) -> Path:
        return sft.train_sft(self)

    def run_eval(self, tag: str) -> dict:
        return evaluate.evaluate(self, tag)

    def difficulty_filter(self) -> list[Task]:
        return difficulty.difficulty_filter(self)

    def stage_rl(self, prompts: list[Task]) -> None:
        rl.train_rl(self, prompts)

    # ---- trainer and engine handles --------------------------------------------------------------
    def make_trainer(self, optimizer: str, lr: float, *, checkpoint: str | os.PathLike | None, hf: Path):
        """A Megatron trainer resumed from `checkpoint` (MegatronBackend.save) or started from HF weights."""
        from k2sys.trainer.backend import MegatronBackend

        tcfg, parallel = self.cfg.trainer.build(optimizer, lr), self.cfg.trainer.parallel()
        if checkpoint is not None:
            return MegatronBackend.from_checkpoint(checkpoint, parallel, train=tcfg)
        return MegatronBackend.from_hf(hf, parallel, train=tcfg)

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
        dtype = self.cfg.trainer.resolved().dtype or mcfg.torch_dtype  # the engine computes in the trainer's dtype
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


class NullMetrics:
    """Non-zero ranks log nothing (rank 0 owns metrics.jsonl)."""

    def log(self, *args: Any, **kwargs: Any) -> None:
        pass

    def close(self) -> None:
        pass


