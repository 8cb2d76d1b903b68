# The embedded toy on 2 CPU cores: one file for every stage (a stage takes the keys it has and lists the rest).
# The stage scripts' defaults are the real 7B runs; this file turns each into its toy version. Stage 0 alone:
#   python data/toy/prepare.py && python embed.py config/toy.py && python retrieve.py config/toy.py \
#     && python evaluate.py config/toy.py
# The whole pipeline (data/toy/run.py) passes this file to every stage, then each stage's own schedule
# (steps, epochs, learning rate, batch) on the command line, as a user would type it.

# the benchmark (data/toy/prepare.py) and its files
data_root = "data/toy"
tokenizer_dir = "data/toy/tokenizer"  # the toy's BPE: scratch models are built on it
query_files = "query/test/mbeir_toyt2i_task0_test.jsonl,query/test/mbeir_toycir_task7_test.jsonl"
pool_files = "cand_pool/test/mbeir_toyt2i_task0_test_cand_pool.jsonl,cand_pool/test/mbeir_toycir_task7_test_cand_pool.jsonl"
train_query_files = "query/train/mbeir_toyt2i_task0_train.jsonl,query/train/mbeir_toycir_task7_train.jsonl"
train_pool_files = "cand_pool/train/mbeir_toyt2i_task0_train_cand_pool.jsonl,cand_pool/train/mbeir_toycir_task7_train_cand_pool.jsonl"
qrels = "data/toy/qrels/test/mbeir_toyt2i_task0_test_qrels.txt,data/toy/qrels/test/mbeir_toycir_task7_test_qrels.txt"
arch = "qwen2_5_vl"
dtype = "float32"
seed = 1337

# stage 0: embedder trained from scratch, candidates and queries seen at 28x28 (one token per image)
embed_init_from = "scratch"
embed_min_pixels = 784
embed_max_pixels = 784
embed_train_steps = 600
embed_out_dir = "out/toy/embed"
emb_dir = "out/toy/embed/emb"  # embed_out_dir/emb: retrieve.py reads it
top_k = 50
ranked = "out/toy/ranked_test.jsonl"        # retrieve.py writes it, evaluate.py scores it
ranked_in = "out/toy/ranked_test.jsonl"     # rollout.py reranks it
ranked_train = "out/toy/ranked_train.jsonl"  # rsft.py and grpo.py sample their prompts from it

# the policy: a 1.3M-parameter Qwen2.5-VL built from scratch (sft.py --init_from=scratch)
n_layer = 4
n_embd = 128
n_head = 4
n_kv_head = 2
vision_depth = 2
vision_hidden = 64

# the views: candidates at 28x28 in the prompt (one token each), tool outputs up to 112x112 (16 tokens)
prompt_min_pixels = 784
prompt_max_pixels = 784
tool_min_pixels = 3136
tool_max_pixels = 12544

# reranking: windows of 5 over the stage-0 top 5, two tool calls, short budgets
top_n = 5
window = 5
stride = 5
max_calls = 2
prompt_style = "compact"  # the project's short prompt and observations, as the toy tokenizer knows them (docs/spec.md §3)
max_new_tokens = 256
max_response_tokens = 1024  # rsft.py and grpo.py; the test reranks (rollout.py) get 2048 from data/toy/run.py

# training, every trainer: one process on CPU, full fp32, no checkpointing inside
grad_accum = 1
grad_checkpointing = False
max_length = 4096
save_every = 0
micro_batch_size = 8        # grpo.py
