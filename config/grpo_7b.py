# GRPO as the V-Retrver release ran it (docs/spec.md §5): Qwen2.5-VL-7B, 8 GPUs, FSDP2, bf16.
# These are grpo.py's defaults, written out so that a run's settings can be read in one place:
#   torchrun --nproc_per_node=8 grpo.py config/grpo_7b.py --policy=out/mbeir/rsft/model
# Memory per 80 GB GPU (python memory.py config/grpo_7b.py, computed): peak 41.3 GiB in generation, the
# fp32 masters, gradients and AdamW state sharded 8 ways (14.5 GiB), the whole policy in bf16 (15.5 GiB)
# and one chunk's KV (gen_kv_gib). Lower gen_kv_gib or micro_batch_size if a rank runs out of memory.

reward = "paper"           # R = 0.2 format + 0.8 Gaussian rank + tool term
use_tools = True
window = 20                # candidates per prompt, as in the released RL data
max_steps = 500            # ~1 epoch over the release's RL prompts at 128 prompts per step
prompts_per_step = 128     # over all ranks: 16 per GPU
group_size = 8
temperature = 1.0
top_p = 1.0
max_calls = 2
max_new_tokens = 4096      # one generation
max_response_tokens = 12288
scale_std = True
loss_agg = "token-mean"
clip_eps_low = 0.2
clip_eps_high = 0.2
dual_clip = 3.0
beta = 0.0                 # no KL and no reference model
ppo_epochs = 1             # on-policy: one optimizer step per rollout batch
micro_batch_size = 2
learning_rate = 1e-6
warmup_steps = 10
weight_decay = 0.01
grad_clip = 1.0
freeze_vision = True
grad_checkpointing = True
dtype = "bfloat16"
prompt_min_pixels = 3136
prompt_max_pixels = 200704  # candidates at up to 448x448 in the prompt
tool_min_pixels = 3136
tool_max_pixels = 2000000   # tool outputs at up to ~2M pixels
save_every = 50
gen_kv_gib = 16.0
logprob_chunk = 1024
