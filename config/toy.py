# The embedded toy pipeline on 2 CPU cores: one file for every stage (each stage takes the keys it has).
# python data/toy/prepare.py && python embed.py config/toy.py && python retrieve.py config/toy.py \
#   && python evaluate.py config/toy.py

data_root = "data/toy"
tokenizer_dir = "data/toy/tokenizer"
arch = "qwen2_5_vl"
seed = 1337

# stage 0: embedder trained from scratch, candidates and queries seen at 28x28 (one token per image)
embed_init_from = "scratch"
embed_min_pixels = 784
embed_max_pixels = 784
embed_train_steps = 600

# retrieval and evaluation
emb_dir = "out/toy/embed/emb"
top_k = 50
ranked = "out/toy/ranked_test.jsonl"
qrels = "data/toy/qrels/test/mbeir_toyt2i_task0_test_qrels.txt,data/toy/qrels/test/mbeir_toycir_task7_test_qrels.txt"
