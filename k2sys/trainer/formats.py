"""On-disk formats of Megatron checkpoints written by k2sys (the `format` field of META), shared by the
trainer (MegatronBackend.save / from_checkpoint) and the converter (k2sys convert)."""

META = "k2sys_megatron.json"
FORMAT_PER_RANK = "k2sys-megatron-per-rank-v1"  # one state dict per TP x EP rank (convert's legacy layout)
FORMAT_DIST = "k2sys-megatron-dist-v1"  # MegatronBackend.save: model + optimizer, megatron dist checkpoint
FORMAT_MODEL_DIST = "k2sys-megatron-model-dist-v1"  # hf-to-megatron: model weights only
