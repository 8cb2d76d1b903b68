"""Run by tests/test_grpo.py (1 process, or 2 under torchrun): one GRPO update (2 epochs, so clipping
matters, with a KL reference) on a fixed global batch of 8 trajectories; rank 0 saves the new weights."""
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import checkpoint  # noqa: E402
import common  # noqa: E402
import grpo  # noqa: E402
from engine import Engine  # noqa: E402
import task  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402

toy_data, out, loss_agg = sys.argv[1], sys.argv[2], sys.argv[3]
rank, _, world, device = common.dist_setup()
tokenizer = AutoTokenizer.from_pretrained(f"{toy_data}/tokenizer")
processor = common.make_processor(tokenizer, 14, 784, 12544)
small = dict(n_layer=2, n_embd=64, n_head=2, n_kv_head=1, vision_depth=1, vision_hidden=32)
model = common.build_tiny_model("qwen2_5_vl", tokenizer, seed=0, **small)
reference = common.build_tiny_model("qwen2_5_vl", tokenizer, seed=0, **small).eval().requires_grad_(False)

# the global batch: the same on every rank (same weights, same seed), 2 prompts x 4 samples
images = [common.qwen_resize(common.load_image(f"{toy_data}/images/test/pool/{i}.png"), 784, 784) for i in range(3)]
prompts = [{"messages": task.build_messages(f"query {p}", False, "", [""] * 3, [True] * 3, False,
                                           style="compact"),
            "prompt_images": images, "tool_images": [None] + images} for p in range(2)]
engine = Engine(model.eval(), processor, use_tools=False)
with torch.no_grad():
    trajs = engine.generate(prompts, n_samples=4, temperature=1.0, max_new_tokens=12, seed=3)
rewards = torch.rand(2, 4, generator=torch.Generator().manual_seed(0))
advantages = grpo.group_advantages(rewards).flatten()
examples = [{"input_ids": t["input_ids"], "loss_mask": t["loss_mask"], "images": t["images"]} for t in trajs]

hp = {"ppo_epochs": 2, "temperature": 1.0, "clip_eps_low": 0.2, "clip_eps_high": 0.2, "dual_clip": 3.0, "beta": 0.1,
      "loss_agg": loss_agg, "max_response_tokens": 64, "grad_clip": 1.0,
      "logprob_chunk": 5}  # several chunks per sequence
assert set(hp) == set(grpo.UPDATE_KEYS)
mine = list(range(rank * 8 // world, (rank + 1) * 8 // world))  # this rank's share; micro-batches of 2
batches = [common.collate([examples[i] for i in mine[j:j + 2]], processor,
                       model.config.image_token_id, tokenizer.pad_token_id) for j in range(0, len(mine), 2)]
model = checkpoint.shard(model.train(), world)
params = [p for p in model.parameters() if p.requires_grad]
optimizer = torch.optim.AdamW(params, lr=1e-3)
sums, norm = grpo.policy_update(model, optimizer, params, batches, advantages[mine], 8, hp, world, device, reference)
sums = grpo.all_reduce_sums(sums, device, world)
from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict  # noqa: E402
state = get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))
if rank == 0:
    torch.save({"state": state, "sums": sums, "norm": norm}, os.path.join(out, "result.pt"))
common.dist_cleanup()
