"""Run by tests/test_rollout.py under torchrun: an FSDP2-sharded policy generates rank-dependent
lengths (no deadlock) and the same tokens as the plain model."""
import json
import os
import sys

import torch

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
import common  # noqa: E402
import task  # noqa: E402
from engine import Engine  # noqa: E402
from transformers import AutoTokenizer  # noqa: E402

toy_data, out = sys.argv[1], sys.argv[2]
rank, _, world, _ = common.dist_setup()
tokenizer = AutoTokenizer.from_pretrained(f"{toy_data}/tokenizer")
processor = common.make_processor(tokenizer, 14, 784, 12544)
plain = common.build_tiny_model("qwen2_5_vl", tokenizer, seed=0).eval()
sharded = common.build_tiny_model("qwen2_5_vl", tokenizer, seed=0).eval()
from torch.distributed.fsdp import fully_shard  # noqa: E402
for layer in sharded.model.language_model.layers:
    fully_shard(layer)
fully_shard(sharded)
images = [common.qwen_resize(common.load_image(f"{toy_data}/images/test/pool/{i}.png"), 784, 784) for i in range(3)]
prompt = {"messages": task.build_messages(f"query of rank {rank}", False, "", [""] * 3, [True] * 3, False,
                                         style="compact"),
          "prompt_images": images, "tool_images": [None] + images}
new_tokens = 4 if rank == 0 else 25  # ranks generate different lengths
results = []
for model in (plain, sharded):
    engine = Engine(model, processor, use_tools=False)
    engine.stop_ids = set()
    results.append(engine.generate([prompt], n_samples=2, max_new_tokens=new_tokens)[0]["input_ids"])
# training still works afterwards: one forward/backward in lockstep
loss = sharded(input_ids=torch.tensor([[5, 6, 7]])).logits.sum()
loss.backward()
json.dump({"equal": results[0] == results[1], "n": len(results[1])}, open(f"{out}/rank{rank}.json", "w"))
common.dist_cleanup()
