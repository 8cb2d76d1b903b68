"""
Stage 0, part 2: top-K candidates per query with faiss, within the query's own local pool.

M-BEIR evaluates each query against the local pool of its own task/dataset, so query_files and
pool_files are paired: the i-th query file is searched in the i-th pool file (a pool may repeat).
Embeddings come from embed.py ({emb_dir}/{name}.npy and {name}.ids.json, name = file name without
.jsonl). Similarity is the inner product of L2-normalised vectors (faiss IndexFlatIP, exact).

    python retrieve.py                     # the 16 M-BEIR test sets, embeddings from out/mbeir/embed/emb
    python retrieve.py config/toy.py

Writes one JSON line per query, best first: {"qid", "task_id", "cands": [did...], "scores": [...]},
and reports (never silently drops) queries whose positives are not in their pool.

Per-query galleries (GeneCIS): a query record with a "gallery" field (a list of dids of its pool) is
scored against those candidates only, exactly (dot products, ties kept in gallery order), and keeps its
top_k of them; queries without the field search the whole pool. data/genecis/prepare.py writes it.
"""

import os

import faiss
import numpy as np

import common
from configurator import configure

# -----------------------------------------------------------------------------
data_root = "data/mbeir"  # the file lists below are relative to it
query_files = common.mbeir_files("query")  # the i-th query file is searched in ...
pool_files = common.mbeir_files("pool")    # ... the i-th pool file
emb_dir = "out/mbeir/embed/emb"  # embed.py's output
top_k = 50               # candidates kept per query (M-BEIR reranking depth 50)
ranked = "out/mbeir/ranked_test.jsonl"  # output ranked JSONL
# -----------------------------------------------------------------------------


def load_embeddings(name):
    emb = np.load(os.path.join(emb_dir, f"{name}.npy")).astype(np.float32)  # (N, D)
    ids = common.read_json(os.path.join(emb_dir, f"{name}.ids.json"))
    if len(ids) != emb.shape[0]:
        raise ValueError(f"{emb_dir}/{name}: {emb.shape[0]} vectors but {len(ids)} ids")
    return emb, ids


def search(query_emb, pool_emb, k):
    """Exact inner-product top-k: (scores, indices), each (Q, min(k, N)), best first."""
    index = faiss.IndexFlatIP(pool_emb.shape[1])
    index.add(np.ascontiguousarray(pool_emb))
    return index.search(np.ascontiguousarray(query_emb), min(k, pool_emb.shape[0]))


def search_gallery(query_vec, pool_emb, index_of, gallery, qid, pool_name, k):
    """Exact top-k of one query within its own gallery: (dids, scores), best first."""
    missing = [d for d in gallery if d not in index_of]
    if missing or not gallery:
        raise ValueError(f"qid {qid}: gallery {'is empty' if not gallery else f'names {missing[0]}, which is not in {pool_name}'}")
    rows = [index_of[d] for d in gallery]
    scores = pool_emb[rows] @ query_vec  # (G,)
    order = np.argsort(-scores, kind="stable")[:k]
    return [gallery[i] for i in order], [float(scores[i]) for i in order]


def main():
    name = lambda f: os.path.basename(f).removesuffix(".jsonl")
    files = lambda s: [f for f in s.split(",") if f]
    out, not_in_pool, not_in_top_k, n_queries = [], [], 0, 0
    for qf, pf in zip(files(query_files), files(pool_files), strict=True):
        queries = common.read_jsonl(common.resolve_path(qf, data_root), required=("qid", "task_id"))
        q_emb, q_ids = load_embeddings(name(qf))
        p_emb, p_ids = load_embeddings(name(pf))
        if q_ids != [q["qid"] for q in queries]:
            raise ValueError(f"{emb_dir}/{name(qf)}.ids.json does not match {qf}: re-run embed.py")
        if not len(p_ids):
            raise ValueError(f"{pf}: the pool is empty, there is nothing to retrieve for {qf}")
        scores, indices = search(q_emb, p_emb, top_k)
        pool = set(p_ids)
        index_of = {d: i for i, d in enumerate(p_ids)}
        for q, q_vec, row_scores, row_idx in zip(queries, q_emb, scores, indices):
            if q.get("gallery") is not None:  # a per-query gallery: only its own candidates
                cands, row_scores = search_gallery(q_vec, p_emb, index_of, q["gallery"], q["qid"], name(pf), top_k)
            else:
                cands = [p_ids[i] for i in row_idx]
            out.append({"qid": q["qid"], "task_id": q["task_id"], "cands": cands,
                        "scores": [round(float(s), 6) for s in row_scores]})
            positives = q.get("pos_cand_list", [])
            if positives and not any(d in pool for d in positives):
                not_in_pool.append(q["qid"])
            elif positives and not any(d in positives for d in cands):
                not_in_top_k += 1
        n_queries += len(queries)
        print(f"{name(qf)}: {len(queries)} queries searched in {name(pf)} ({len(p_ids)} candidates)")
    common.write_jsonl(ranked, out)
    print(f"wrote top-{top_k} for {n_queries} queries to {ranked}; "
          f"positive outside the top-{top_k}: {not_in_top_k}")
    if not_in_pool:
        print(f"WARNING: {len(not_in_pool)} queries have no positive in their pool (kept, they count as misses): "
              f"{', '.join(not_in_pool[:5])}")


if __name__ == "__main__":
    configure(globals())
    main()
