# SFT as the V-Retrver release ran it (docs/spec.md §6): Qwen2.5-VL-7B-Instruct, 8 GPUs, FSDP2, bf16.
# These are sft.py's defaults, written out so that a run's settings can be read in one place:
#   torchrun --nproc_per_node=8 sft.py config/sft_7b.py --init_from=checkpoints/Qwen2.5-VL-7B-Instruct
# Global batch 64 = 8 GPUs x batch_size 1 x grad_accum 8. Memory per 80 GB GPU (python memory.py
# config/sft_7b.py, computed): peak 36.6 GiB in training at T = 32,768 with gradient checkpointing.

epochs = 2.0
batch_size = 1
grad_accum = 8
learning_rate = 1e-5
warmup_frac = 0.1
min_lr_frac = 0.0
freeze_vision = True       # vision tower and projector frozen
max_length = 32768
prompt_min_pixels = 3136
prompt_max_pixels = 2000000
tool_min_pixels = 3136
tool_max_pixels = 2000000
grad_checkpointing = True
dtype = "bfloat16"
save_every = 500
logprob_chunk = 1024
