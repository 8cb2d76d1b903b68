# Rejection-sampling SFT as the V-Retrver release ran it (docs/spec.md §1, §6): sample from the SFT model,
# keep the well-formed trajectories that rank the positive first, fine-tune again with the SFT recipe
# (sftconfig/qwen2_5vl_retrv_full_rft.yaml: lr 1e-5, cosine, 10% warm-up, 2 epochs, batch 1 x 8 accumulation
# per GPU, vision tower and projector frozen, images <= 2M pixels, bf16). rsft.py's defaults otherwise:
#   torchrun --nproc_per_node=8 rsft.py config/rsft_7b.py --policy=out/mbeir/sft/model

n_samples = 8
window = 20
temperature = 1.0
top_p = 1.0
max_calls = 2
max_new_tokens = 4096
max_response_tokens = 12288
use_tools = True
prompt_style = "release"
prompt_min_pixels = 3136
prompt_max_pixels = 200704
tool_min_pixels = 3136
tool_max_pixels = 2000000
epochs = 2.0
batch_size = 1
grad_accum = 8
learning_rate = 1e-5
warmup_frac = 0.1
min_lr_frac = 0.0
freeze_vision = True
grad_checkpointing = True
dtype = "bfloat16"
