"""Megatron trainer backend: K2 on megatron-core (spec), one naming table (naming), HF <-> Megatron
conversion (convert), AdamW/Muon (optim), offload/onload (offload), and MegatronBackend (backend).

Import the submodules directly; importing this package does not import megatron-core.
"""
