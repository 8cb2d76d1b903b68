"""
The agentic generation engine: a hand-written KV-cached loop that pauses on tool calls, runs the tool and
splices the observation (with its images) into the row's cache. rollout.py (reranking), rsft.py and grpo.py
all sample through it; tests/test_rollout.py checks it against a full forward pass.

How the engine works (Engine.generate):
- group-shared prefill: the distinct prompts (system + query + K candidate images) are left-padded into
  one batch and prefilled once; each prompt's cache row is then repeated for its G samples (padding is
  masked through the full-length attention_mask).
- every step runs ONE forward for all unfinished rows. A decoding row feeds its last sampled token; a row
  that just closed a tool call (</tool_call>) feeds its whole observation chunk
  `<|im_end|>\\n<|im_start|>user\\n{text + images}<|im_end|>\\n<|im_start|>assistant\\n`
  with its pixel values; chunks are right-padded to the longest in the step, so splicing rows and
  decoding rows share the step and the pad slots stay masked in the cache for good. Finished rows
  leave the batch at once, so nobody waits on them.
- positions are explicit M-RoPE ids (docs/spec.md §8): a chunk's positions are computed on the chunk alone
  and shifted to the row's next free position; leaving them to the model is silently wrong.
- vision/pad tokens can never be sampled; a row ends at <|im_end|>/EOS, when it makes a call past
  max_calls (the call is run and recorded, nothing more is generated: no answer), or at its token budget.
- output per trajectory: exact token ids, loss mask (1 = sampled by the policy, 0 = prompt and observation
  tokens, including the <|im_end|> that opens an observation), the images in sequence order with their
  grids, the tool calls, the policy's own text per turn, the parsed answer and the stop reason.
"""

import contextlib

import torch

import common
import tools
from task import parse_answer

VISION_TOKENS = ["<|image_pad|>", "<|video_pad|>", "<|vision_start|>", "<|vision_end|>", "<|vision_pad|>"]


def mrope_positions(ids, image_grid_thw, image_token_id, start, merge=common.MERGE):
    """(3, L) M-RoPE positions of one chunk whose first token sits at text position `start`, and the next
    free position. Text gets (p, p, p), p += 1; the image token at merged cell (i, j) gets (p, p+i, p+j),
    then p += max(h, w)."""
    grids = iter(image_grid_thw.tolist() if image_grid_thw is not None else [])
    parts, p, i = [], start, 0
    while i < len(ids):
        if ids[i] == image_token_id:
            _, h, w = next(grids)
            h, w = h // merge, w // merge
            rows = torch.arange(h).repeat_interleave(w)
            cols = torch.arange(w).repeat(h)
            parts.append(torch.stack([torch.full((h * w,), p), p + rows, p + cols]))
            i, p = i + h * w, p + max(h, w)
        else:
            j = i
            while j < len(ids) and ids[j] != image_token_id:
                j += 1
            parts.append(torch.arange(p, p + j - i).expand(3, -1))
            i, p = j, p + j - i
    return torch.cat(parts, dim=1), p


class Row:
    """One trajectory being generated."""

    def __init__(self, prompt_index, sample_index, ids, images, grids, next_pos):
        self.prompt_index, self.sample_index = prompt_index, sample_index
        self.ids, self.mask = list(ids), [0] * len(ids)  # the whole sequence and its loss mask
        self.images, self.grids = list(images), list(grids)  # every image in sequence order
        self.next_pos = next_pos  # next free M-RoPE text position
        self.turn_start = len(ids)  # where the current assistant turn began
        self.turns, self.tool_calls = [], []  # the policy's own text per turn; every call made
        self.observations = []  # each spliced observation as ShareGPT text (<image> placeholders)
        self.pending = None  # the observation chunk to feed next, if any
        self.stop_reason = None
        self.generated_this_turn = 0
        self.response_tokens = 0
        self.logits = []  # (optional) every logit row used to sample this row's tokens


class Engine:
    """Generation with tool calls for one model + processor (nanochat's engine, for a VLM with tools)."""

    def __init__(self, model, processor, use_tools=True, max_calls=2, tool_min_pixels=3136, tool_max_pixels=2000000):
        self.model, self.processor, self.tok = model, processor, processor.tokenizer
        self.use_tools, self.max_calls = use_tools, max_calls
        self.tool_min_pixels, self.tool_max_pixels = tool_min_pixels, tool_max_pixels
        self.factor = processor.image_processor.patch_size * processor.image_processor.merge_size
        self.image_token_id = model.config.image_token_id
        ids = lambda t: self.tok.convert_tokens_to_ids(t)
        self.im_end, self.tool_end = ids("<|im_end|>"), ids("</tool_call>")
        self.stop_ids = {self.im_end, self.tok.eos_token_id, ids("<|endoftext|>")} - {None}
        self.pad_id = self.tok.pad_token_id if self.tok.pad_token_id is not None else self.im_end
        vocab = self.tok.get_vocab()
        self.banned = [vocab[t] for t in VISION_TOKENS if t in vocab]  # never sampled
        self.device = next(model.parameters()).device

    def encode(self, text, images):
        """Token ids, pixel values and grids of a piece of text with image placeholders."""
        batch = self.processor(text=[text], images=images or None, return_tensors="pt")
        grids = batch.get("image_grid_thw")
        return batch["input_ids"][0].tolist(), batch.get("pixel_values"), grids

    def observation_chunk(self, result):
        user = self.processor.apply_chat_template([{"role": "user", "content": result.content}], tokenize=False)
        return "<|im_end|>\n" + user + "<|im_start|>assistant\n"  # user = <|im_start|>user\n...<|im_end|>\n

    @torch.no_grad()
    def generate(self, prompts, n_samples=1, temperature=0.0, top_p=1.0, max_new_tokens=512,
                 max_response_tokens=2048, seed=0, logits_hook=None, keep_logits=False):
        """prompts: dicts with messages, prompt_images (placeholder order, prompt resolution) and tool_images
        (0 = query or None, i = candidate i, original resolution). Returns n_samples trajectories per prompt,
        prompt-major. logits_hook(row, logits) may edit a row's logits before sampling (tests)."""
        gen = torch.Generator(device="cpu").manual_seed(seed)
        with unsharded(self.model):  # FSDP: gather the weights once, then no collective until the end
            return self._generate(prompts, n_samples, temperature, top_p, max_new_tokens, max_response_tokens,
                                  gen, logits_hook, keep_logits)

    def _generate(self, prompts, n_samples, temperature, top_p, max_new_tokens, max_response_tokens, gen,
                  logits_hook, keep_logits):
        model, dev = self.model, self.device
        # group-shared prefill: the distinct prompts, left-padded into one batch, once; then each row of the
        # cache is repeated for its n_samples (padding stays masked through the full-length attention_mask)
        encoded = []
        for prompt in prompts:
            text = self.processor.apply_chat_template(prompt["messages"], add_generation_prompt=True, tokenize=False)
            ids, pixels, grids = self.encode(text, prompt["prompt_images"])
            pos, next_pos = mrope_positions(ids, grids, self.image_token_id, 0)
            encoded.append((ids, pixels, grids, pos, next_pos))
        width = max(len(e[0]) for e in encoded)
        input_ids = torch.full((len(prompts), width), self.pad_id, dtype=torch.long)
        position_ids = torch.zeros(3, len(prompts), width, dtype=torch.long)
        attn = torch.zeros(len(prompts), width, dtype=torch.long)
        rows = []
        for p, (ids, pixels, grids, pos, next_pos) in enumerate(encoded):
            input_ids[p, width - len(ids):] = torch.tensor(ids)
            position_ids[:, p, width - len(ids):] = pos
            attn[p, width - len(ids):] = 1
            for g in range(n_samples):
                rows.append(Row(p, g, ids, prompts[p]["prompt_images"], [] if grids is None else grids.tolist(), next_pos))
        pixels = [e[1] for e in encoded if e[1] is not None]
        grids = [e[2] for e in encoded if e[2] is not None]
        cache = common.new_cache(model)
        out = model(input_ids=input_ids.to(dev), attention_mask=attn.to(dev), position_ids=position_ids.to(dev),
                    pixel_values=torch.cat(pixels).to(dev, model.dtype) if pixels else None,
                    image_grid_thw=torch.cat(grids).to(dev) if grids else None,
                    past_key_values=cache, use_cache=True, logits_to_keep=1)
        cache.batch_repeat_interleave(n_samples)
        attn = attn.to(dev).repeat_interleave(n_samples, dim=0)
        logits = out.logits[:, -1].repeat_interleave(n_samples, dim=0)  # (B, V), B = prompts x samples
        active = list(range(len(rows)))  # rows[active[b]] is batch row b
        while active:
            # sample one token for every active row, then decide what each row feeds next
            logits = logits.float()
            raw = logits.cpu().clone() if keep_logits else None  # what the model computed, before masking
            logits[:, self.banned] = -float("inf")
            if logits_hook is not None:
                logits = torch.stack([logits_hook(rows[r], logits[b]) for b, r in enumerate(active)])
            tokens = sample(logits, temperature, top_p, gen).tolist()  # (B,)
            keep = []
            for b, (r, token) in enumerate(zip(active, tokens)):
                row = rows[r]
                if keep_logits:
                    row.logits.append(raw[b])
                row.ids.append(token)
                row.mask.append(1)
                row.generated_this_turn += 1
                row.response_tokens += 1
                if self.step_row(row, token, prompts[row.prompt_index], max_new_tokens, max_response_tokens):
                    keep.append(b)
            if not keep:
                break
            if len(keep) < len(active):  # finished rows leave the batch now
                index = torch.tensor(keep, device=dev)
                cache.batch_select_indices(index)
                attn = attn[index]
                active = [active[b] for b in keep]
            logits, attn = self.forward_step([rows[r] for r in active], cache, attn)
        return [self.trajectory(row) for row in rows]

    def step_row(self, row, token, prompt, max_new_tokens, max_response_tokens):
        """Update a row after it sampled `token`; False if the row is finished."""
        if token in self.stop_ids:
            row.turns.append(self.tok.decode(row.ids[row.turn_start:]))
            row.stop_reason = "stop"
            return False
        if token == self.tool_end and self.use_tools:
            turn_text = self.tok.decode(row.ids[row.turn_start:])
            row.turns.append(turn_text)
            result = tools.execute_tool_call(turn_text, prompt["tool_images"], self.tool_min_pixels,
                                             self.tool_max_pixels, self.factor)
            row.tool_calls.append({"name": result.name, "arguments": result.arguments, "valid": result.valid,
                                   "error": result.error})
            if len(row.tool_calls) > self.max_calls:
                row.stop_reason = "max_calls"  # run and recorded, but nothing more is generated
                return False
            ids, pixels, grids = self.encode(self.observation_chunk(result), result.images)
            if row.response_tokens + len(ids) > max_response_tokens:
                row.stop_reason = "length"
                return False
            row.pending = (ids, pixels, grids, result.images)
            row.observations.append("".join("<image>" if p["type"] == "image" else p["text"] for p in result.content))
            return True
        if row.generated_this_turn >= max_new_tokens or row.response_tokens >= max_response_tokens:
            row.turns.append(self.tok.decode(row.ids[row.turn_start:]))
            row.stop_reason = "length"
            return False
        return True

    def forward_step(self, batch_rows, cache, attn):
        """One forward for all active rows: each feeds its pending observation chunk or its last token."""
        dev, model = self.device, self.model
        if all(row.pending is None for row in batch_rows):  # the common case: every row decodes one token
            input_ids = torch.tensor([[row.ids[-1]] for row in batch_rows], device=dev)  # (B, 1)
            position_ids = torch.tensor([row.next_pos for row in batch_rows], device=dev).view(1, -1, 1).expand(3, -1, 1)
            for row in batch_rows:
                row.next_pos += 1
            attn = torch.cat([attn, torch.ones(len(batch_rows), 1, dtype=attn.dtype, device=dev)], dim=1)
            out = model(input_ids=input_ids, attention_mask=attn, position_ids=position_ids, past_key_values=cache,
                        use_cache=True, logits_to_keep=1)
            return out.logits[:, -1], attn
        chunks = []
        for row in batch_rows:
            if row.pending is not None:  # the sampled </tool_call>, then the observation
                ids, pixels, grids, images = row.pending
                row.pending = None
                feed = [row.ids[-1]] + ids
                pos, row_next = mrope_positions(feed, grids, self.image_token_id, row.next_pos)
                row.ids += ids
                row.mask += [0] * len(ids)
                row.images += images
                row.grids += [] if grids is None else grids.tolist()
                row.response_tokens += len(ids)
                row.turn_start, row.generated_this_turn = len(row.ids), 0
                chunks.append((feed, pos, pixels, grids))
                row.next_pos = row_next
            else:
                chunks.append(([row.ids[-1]], torch.full((3, 1), row.next_pos), None, None))
                row.next_pos += 1
        width = max(len(c[0]) for c in chunks)
        input_ids = torch.full((len(chunks), width), self.pad_id, dtype=torch.long)
        position_ids = torch.zeros(3, len(chunks), width, dtype=torch.long)
        chunk_mask = torch.zeros(len(chunks), width, dtype=torch.long)
        for b, (ids, pos, _, _) in enumerate(chunks):
            input_ids[b, :len(ids)] = torch.tensor(ids)
            position_ids[:, b, :len(ids)] = pos
            chunk_mask[b, :len(ids)] = 1
        pixels = [c[2] for c in chunks if c[2] is not None]
        grids = [c[3] for c in chunks if c[3] is not None]
        attn = torch.cat([attn, chunk_mask.to(dev)], dim=1)
        last = (chunk_mask.sum(1) - 1).to(dev)  # (B,) each row's last real slot in the chunk
        keep = torch.unique(last)  # the LM head runs only where some row needs its logits
        out = self.model(input_ids=input_ids.to(dev), attention_mask=attn, position_ids=position_ids.to(dev),
                         pixel_values=torch.cat(pixels).to(dev, model.dtype) if pixels else None,
                         image_grid_thw=torch.cat(grids).to(dev) if grids else None,
                         past_key_values=cache, use_cache=True, logits_to_keep=keep)
        return out.logits[torch.arange(len(chunks), device=dev), torch.searchsorted(keep, last)], attn

    def trajectory(self, row):
        text = "".join(row.turns)
        valid_calls = sum(c["valid"] for c in row.tool_calls)
        out = {"prompt_index": row.prompt_index, "sample_index": row.sample_index, "input_ids": row.ids,
               "loss_mask": row.mask, "images": row.images, "image_grid_thw": row.grids, "turns": row.turns,
               "final_text": row.turns[-1] if row.turns else "", "answer": parse_answer(text),
               "tool_calls": row.tool_calls, "observations": row.observations, "n_valid_calls": valid_calls, "stop_reason": row.stop_reason,
               "n_generated": sum(row.mask)}
        if row.logits:
            out["logits"] = row.logits
        return out


@contextlib.contextmanager
def unsharded(model):
    """Generation with an FSDP2-sharded policy: ranks run different numbers of forwards (rows end at
    different lengths), which would deadlock the per-layer all-gathers. So all-gather every shard once,
    in the same order on every rank, keep the weights whole during generation, and reshard after."""
    from torch.distributed.fsdp import FSDPModule
    fsdp = [m for m in model.modules() if isinstance(m, FSDPModule)]
    if not fsdp:
        yield
        return
    for m in fsdp:
        m.set_reshard_after_forward(False, recurse=False)
        m.unshard()
    try:
        yield
    finally:
        for m in fsdp:
            m.reshard()
            m.set_reshard_after_forward(m is not model, recurse=False)  # FSDP2's defaults: the root keeps its weights


def sample(logits, temperature, top_p, generator):
    """(B, V) logits -> (B,) tokens: greedy at temperature 0, else temperature + nucleus (top-p) sampling."""
    if temperature <= 0:
        return torch.argmax(logits, dim=-1)
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = torch.sort(probs, dim=-1, descending=True)
        outside = torch.cumsum(sorted_probs, -1) - sorted_probs > top_p  # keep the smallest set reaching top_p
        sorted_probs[outside] = 0
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    return torch.multinomial(probs.cpu(), 1, generator=generator).view(-1)
