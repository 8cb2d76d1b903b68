# Stage 0 with a LamRA-Ret checkpoint on the 16 M-BEIR test sets and their local pools (docs/spec.md §1, §7):
# LamRA's prompt and summary position (embed_prompt=lamra), images at up to 300 x 28 x 28 pixels as LamRA's
# evaluation resizes them, the top 50 per query. One file for embed.py, retrieve.py and evaluate.py:
#   torchrun --nproc_per_node=8 embed.py config/stage0_7b.py --embed_init_from=checkpoints/LamRA-Ret
#   python retrieve.py config/stage0_7b.py && python evaluate.py config/stage0_7b.py

data_root = "data/mbeir"
instructions_file = "instructions.json"  # data/mbeir/instructions.py writes it from query_instructions.tsv
embed_init_from = "checkpoints/LamRA-Ret"
embed_prompt = "lamra"
embed_train_steps = 0
embed_min_pixels = 3136
embed_max_pixels = 235200
encode_batch_size = 16
embed_out_dir = "out/mbeir/embed"
dtype = "bfloat16"
emb_dir = "out/mbeir/embed/emb"
top_k = 50
ranked = "out/mbeir/ranked_test.jsonl"
benchmark = "mbeir"
