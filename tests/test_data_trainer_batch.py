"""The SFT batch format against its consumer: on the Megatron backend, packed and padded batches of
the same conversations give the same log-probabilities on loss tokens as the HF-layout reference
model run on each conversation alone."""

import warnings

import pytest
import torch

pytest.importorskip("megatron.core")
warnings.filterwarnings("ignore")


def test_packed_batches_on_megatron_match_per_conversation_reference(tmp_path):
    from k2sys.data import SFTDataConfig, load_sft_data
    from k2sys.data.synth import write_synth_sft
    from k2sys.models import build_model, k2_tiny
    from k2sys.tokenizer import default_corpus, load_tokenizer, train_tokenizer
    from k2sys.trainer.backend import MegatronBackend

    train_tokenizer(default_corpus(200), 512, tmp_path / "tok")
    tok = load_tokenizer(tmp_path / "tok")
    write_synth_sft(tmp_path / "s.jsonl", n_tool_use=0, families=["arithmetic", "countdown"], n_per_family=6)
    ref = build_model(k2_tiny(512), seed=0)
    backend = MegatronBackend.from_model(ref)
    sums = {}
    for pack in (True, False):
        data = load_sft_data(SFTDataConfig(path=str(tmp_path / "s.jsonl"), seq_len=96, rows_per_batch=2,
                                           pack=pack, heldout_fraction=0.0), tokenizer=tok)
        lp = [backend.logprobs(b) * b["loss_mask"] for b, _ in data.train_batches(epochs=1)]
        sums[pack] = torch.stack([x.sum() for x in lp]).sum().double()
    want = torch.zeros((), dtype=torch.float64)
    for s in data.train:
        ids = torch.as_tensor(s.input_ids, dtype=torch.long)[None]
        with torch.no_grad():
            logp = torch.log_softmax(ref(ids)[0, :-1].float(), -1).gather(-1, ids[0, 1:, None])[:, 0]
        want += (logp * torch.as_tensor(s.loss_mask[1:], dtype=torch.float32)).sum().double()
    assert want < 0
    torch.testing.assert_close(sums[True], want, rtol=1e-5, atol=1e-4)
    torch.testing.assert_close(sums[False], want, rtol=1e-5, atol=1e-4)
