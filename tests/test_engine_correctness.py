"""Native engine vs transformers.DeepseekV3ForCausalLM on the same saved checkpoint (fp32):
greedy tokens equal token for token, logprobs equal to transformers' log-softmax within 1e-4,
through chunked prefill, continuous batching, prefix-shared n samples and KV retraction."""

from __future__ import annotations

import dataclasses

import pytest
import torch

from k2sys.engine.core.config import EngineConfig, SamplingParams
from k2sys.engine.core.engine import NativeEngine
from k2sys.models import build_model, k2_tiny, save_hf

transformers = pytest.importorskip("transformers")

NEW = 64


@pytest.fixture(scope="module")
def ckpt(tmp_path_factory):
    cfg = dataclasses.replace(k2_tiny(vocab_size=512), initializer_range=0.05, eos_token_id=None)
    model = build_model(cfg, seed=3)
    return save_hf(model, tmp_path_factory.mktemp("ckpt") / "tiny")


@pytest.fixture(scope="module")
def hf(ckpt):
    m = transformers.DeepseekV3ForCausalLM.from_pretrained(str(ckpt), dtype=torch.float32).eval()
    m.generation_config.eos_token_id = None
    m.generation_config.pad_token_id = 0
    return m


def hf_greedy(hf, prompts: torch.Tensor) -> tuple[list[list[int]], list[list[float]]]:
    with torch.inference_mode():
        g = hf.generate(prompts, attention_mask=torch.ones_like(prompts), max_new_tokens=NEW, do_sample=False,
                        return_dict_in_generate=True, output_logits=True)
    new = g.sequences[:, prompts.shape[1]:]
    logp = torch.stack(g.logits, 1).float().log_softmax(-1)  # [B, NEW, V]
    lps = logp.gather(2, new[..., None])[..., 0]
    return new.tolist(), lps.tolist()


def check(outs, ref_ids, ref_lps):
    for out, ids, lps in zip(outs, ref_ids, ref_lps):
        assert out["output_ids"] == ids
        got = [row[0] for row in out["meta_info"]["output_token_logprobs"]]
        assert [row[1] for row in out["meta_info"]["output_token_logprobs"]] == ids
        assert max(abs(a - b) for a, b in zip(got, lps)) < 1e-4
        assert out["meta_info"]["finish_reason"] == {"type": "length", "length": NEW}


@pytest.mark.parametrize("prompt_len", [1, 7, 40])
def test_greedy_batch1_matches_transformers(ckpt, hf, prompt_len):
    g = torch.Generator().manual_seed(prompt_len)
    prompt = torch.randint(0, 512, (1, prompt_len), generator=g)
    ref_ids, ref_lps = hf_greedy(hf, prompt)
    with NativeEngine.from_pretrained(ckpt, EngineConfig(max_total_tokens=4096)) as eng:
        outs = eng.generate_sglang(prompt.tolist(), SamplingParams(temperature=0, max_new_tokens=NEW),
                                   return_logprob=True)
    check(outs, ref_ids, ref_lps)


@pytest.mark.parametrize("budget", [4096, 24])  # 24: prompts arrive in chunks, decode shares steps with prefill
def test_greedy_batch8_matches_transformers(ckpt, hf, budget):
    g = torch.Generator().manual_seed(8)
    prompts = torch.randint(0, 512, (8, 19), generator=g)
    ref_ids, ref_lps = hf_greedy(hf, prompts)
    with NativeEngine.from_pretrained(ckpt, EngineConfig(max_total_tokens=4096, max_num_batched_tokens=budget)) as eng:
        outs = eng.generate_sglang(prompts.tolist(), SamplingParams(temperature=0, max_new_tokens=NEW),
                                   return_logprob=True)
        assert eng.cache.allocator.num_free == eng.cache.num_blocks  # every block came back
    check(outs, ref_ids, ref_lps)


def test_kv_pressure_retracts_and_stays_exact(ckpt, hf):
    """A cache too small for 8 x 83 tokens at once: sequences are retracted, recomputed, still exact."""
    g = torch.Generator().manual_seed(9)
    prompts = torch.randint(0, 512, (8, 19), generator=g)
    ref_ids, ref_lps = hf_greedy(hf, prompts)
    with NativeEngine.from_pretrained(ckpt, EngineConfig(max_total_tokens=256, block_size=16)) as eng:
        outs = eng.generate_sglang(prompts.tolist(), SamplingParams(temperature=0, max_new_tokens=NEW),
                                   return_logprob=True)
        assert eng.scheduler.retractions > 0
    check(outs, ref_ids, ref_lps)


def test_n_samples_share_prompt_blocks(ckpt, hf):
    """n greedy samples of one prompt: one prefill, full prompt blocks shared (refcount n), all equal
    to transformers' greedy continuation."""
    prompt = torch.arange(3, 3 + 37)[None]  # 37 tokens = 2 full blocks of 16 + a partial one
    ref_ids, ref_lps = hf_greedy(hf, prompt)
    with NativeEngine.from_pretrained(ckpt, EngineConfig(max_total_tokens=4096, block_size=16)) as eng:
        seen = {}

        def spy(sample, out, finished):
            if not seen and len(out["output_ids"]) == 1:
                seen["shared"] = [eng.cache.allocator.refcount[b] for b in eng.scheduler.running[0].blocks[:2]]
        h = eng.submit(prompt[0].tolist(), SamplingParams(temperature=0, max_new_tokens=NEW, n=4),
                       return_logprob=True, on_update=spy)
        outs = h.result(timeout=300)
        steps_prefill_tokens = eng.scheduler.generated_tokens
    assert seen["shared"] == [4, 4]
    assert steps_prefill_tokens == 4 * NEW
    assert [o["meta_info"]["id"] for o in outs] == [f"{h.request.rid}-{i}" for i in range(4)]
    check(outs, ref_ids * 4, ref_lps * 4)
