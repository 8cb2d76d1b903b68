# Reranking as the V-Retrver release evaluates (docs/spec.md §1, §5, §10): Qwen2.5-VL-7B policy, greedy, the
# stage-0 top 50 in windows of 20 moving back to front by 10, at most 2 tool calls, the release's prompt.
# These are rollout.py's defaults, written out so that a run's settings can be read in one place:
#   torchrun --nproc_per_node=8 rollout.py config/rollout_7b.py --policy=checkpoints/V-Retrver-7B
# (The release's eval.sh allows 16,384 response tokens; its RL run, whose budgets these are, 12,288.)

top_n = 50
window = 20
stride = 10
use_tools = True
prompt_style = "release"
max_calls = 2
max_new_tokens = 4096        # one assistant turn
max_response_tokens = 12288  # generated + observation tokens per trajectory
temperature = 0.0            # greedy, one sample
top_p = 1.0
prompt_min_pixels = 3136
prompt_max_pixels = 200704   # candidates at up to 448x448 in the prompt
tool_min_pixels = 3136
tool_max_pixels = 2000000    # tool outputs at up to ~2M pixels
dtype = "bfloat16"
gen_kv_gib = 16.0
