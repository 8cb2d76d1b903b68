"""
The agentic generation engine: a hand-written KV-cached loop that pauses on tool calls, runs the tool and
splices the observation (with its images) into the row's cache. rollout.py (reranking), rsft.py and grpo.py
all sample through it; tests/test_rollout.py checks it against a full forward pass.

How the engine works (Engine.generate):
- bounded batches: prompts are generated in chunks whose KV cache fits kv_budget_gib (a group's samples
  stay in one chunk); each row samples with its own generator, seeded by (seed, the prompt's key, the
  sample index), so a trajectory does not depend on the chunking or on which other prompts share its batch:
  a resumed run draws the same samples.
- group-shared prefill: a chunk's distinct prompts are right-padded into one batch and prefilled once;
  each prompt's cache row is then copied for its G samples.
- a ragged KV cache (RaggedCache): row b's keys and values live in slots [0, length_b) whatever the other
  rows hold. Every step runs ONE forward for all unfinished rows: a decoding row feeds its last sampled
  token; a row that just closed a tool call (</tool_call>) feeds its whole observation chunk
  `<|im_end|>\\n<|im_start|>user\\n{text + images}<|im_end|>\\n<|im_start|>assistant\\n`
  with its pixel values. Chunks are right-padded to the longest in the step, but each row writes at its
  own offset and only its real tokens count: the step's pad slots are overwritten by the row's next
  tokens, so a row's slots stay about its own length (the cache is as long as the longest row plus the
  step's width). A per-row 4D mask (slot j visible to a row's query i iff j <= length_b + i) replaces
  the padding mask. Finished rows leave the batch at once, so nobody waits on them.
- positions are explicit M-RoPE ids (docs/spec.md §8): a chunk's positions are computed on the chunk alone
  and shifted to the row's next free position; leaving them to the model is silently wrong.
- vision/pad tokens can never be sampled; a row ends at <|im_end|>/EOS, when it makes a call past
  max_calls (the call is run and recorded, nothing more is generated: no answer), or at its token budget.
- output per trajectory: exact token ids, loss mask (1 = sampled by the policy, 0 = prompt and observation
  tokens, including the <|im_end|> that opens an observation), the images in sequence order with their
  grids, the tool calls, the policy's own text per turn, the parsed answer and the stop reason.
"""

import contextlib
import hashlib

import torch
from transformers.cache_utils import Cache, DynamicLayer

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


class RaggedLayer(DynamicLayer):
    """One layer's keys and values, (B, H, capacity, D): row b writes its next tokens at cache.lengths[b]."""

    def __init__(self, cache):
        super().__init__()
        self.cache = cache

    def update(self, key_states, value_states, *args, **kwargs):
        B, H, W, D = key_states.shape  # this step's chunk, right-padded to width W
        lengths = self.cache.lengths_on(key_states.device)
        needed = self.cache.max_length + W
        if not self.is_initialized or self.keys.shape[2] < needed:  # grow with a small slack (one copy per ~6% of growth)
            capacity = needed + max(16, needed // 16)
            keys = key_states.new_zeros(B, H, capacity, D)
            values = value_states.new_zeros(B, H, capacity, D)
            if self.is_initialized:
                keys[:, :, :self.keys.shape[2]] = self.keys
                values[:, :, :self.values.shape[2]] = self.values
            self.keys, self.values = keys, values
            self.dtype, self.device, self.is_initialized = key_states.dtype, key_states.device, True
        slots = (lengths[:, None] + torch.arange(W, device=lengths.device)).view(B, 1, W, 1).expand(B, H, W, D)
        self.keys.scatter_(2, slots, key_states)  # pad slots past a row's real tokens are overwritten later
        self.values.scatter_(2, slots, value_states)
        return self.keys[:, :, :needed], self.values[:, :, :needed]

    def get_seq_length(self):
        return self.cache.max_length

    def batch_repeat_interleave(self, repeats):
        self.keys = self.keys.repeat_interleave(repeats, dim=0)
        self.values = self.values.repeat_interleave(repeats, dim=0)

    def batch_select_indices(self, indices):
        self.keys = self.keys[indices]
        self.values = self.values[indices]


class RaggedCache(Cache):
    """A KV cache whose rows have their own lengths (B,): see RaggedLayer. The engine sets `lengths` to the
    rows' current lengths before a forward and advances them by each row's real tokens after it."""

    def __init__(self, n_layers):
        super().__init__(layers=[RaggedLayer(self) for _ in range(n_layers)])
        self.lengths = None

    @property
    def lengths(self):
        return self._lengths

    @lengths.setter
    def lengths(self, value):  # (B,) on the CPU; its device copy and maximum are made once per step, not per layer
        self._lengths, self._on_device = value, {}
        self.max_length = int(value.max()) if value is not None and len(value) else 0

    def lengths_on(self, device):
        if device not in self._on_device:
            self._on_device[device] = self._lengths.to(device)
        return self._on_device[device]

    def capacity(self):
        """Slots allocated per row (every layer holds the same)."""
        layer = self.layers[0]
        return layer.keys.shape[2] if layer.is_initialized else 0

    def batch_repeat_interleave(self, repeats):
        self.lengths = self.lengths.repeat_interleave(repeats)
        for layer in self.layers:
            layer.batch_repeat_interleave(repeats)

    def batch_select_indices(self, indices):
        self.lengths = self.lengths[indices.cpu()]
        for layer in self.layers:
            layer.batch_select_indices(indices)


def ragged_mask(lengths, width, dtype, device):
    """(B, 1, width, S) attention mask of one step: row b's query i sits at slot lengths[b] + i and sees the
    slots j <= lengths[b] + i (its own past and its own chunk, causally). Boolean for SDPA (True = attend),
    additive for eager attention."""
    lengths = lengths.to(device)
    S = int(lengths.max()) + width
    query_slot = lengths[:, None] + torch.arange(width, device=device)  # (B, W)
    visible = torch.arange(S, device=device)[None, None, :] <= query_slot[:, :, None]  # (B, W, S)
    if dtype is None:
        return visible[:, None]
    return torch.zeros(visible.shape, dtype=dtype, device=device).masked_fill(~visible, torch.finfo(dtype).min)[:, None]


def row_generator(seed, key, sample_index):
    """A CPU generator for one trajectory, seeded by (seed, the prompt's key, the sample index): the same
    trajectory draws the same numbers however prompts are batched, chunked or resumed."""
    digest = hashlib.sha256(repr((seed, key, sample_index)).encode()).digest()
    return torch.Generator(device="cpu").manual_seed(int.from_bytes(digest[:8], "little") & (2 ** 63 - 1))


class Row:
    """One trajectory being generated."""

    def __init__(self, prompt_index, sample_index, ids, images, grids, next_pos, generator):
        self.prompt_index, self.sample_index = prompt_index, sample_index
        self.generator = generator  # this trajectory's own random numbers
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

    def __init__(self, model, processor, use_tools=True, max_calls=2, tool_min_pixels=3136, tool_max_pixels=2000000,
                 kv_budget_gib=16.0, kv_dtype=None):
        self.model, self.processor, self.tok = model, processor, processor.tokenizer
        self.use_tools, self.max_calls = use_tools, max_calls
        text = model.config.get_text_config()
        head_dim = getattr(text, "head_dim", None) or text.hidden_size // text.num_attention_heads
        # K and V of every layer, one token, in the dtype generation computes in (a trainer's fp32 masters
        # generate through bf16 copies: kv_dtype): the unit of the chunk budget
        itemsize = (kv_dtype or model.dtype).itemsize
        self.kv_bytes_per_token = 2 * text.num_hidden_layers * text.num_key_value_heads * head_dim * itemsize
        self.kv_budget_bytes = kv_budget_gib * 2 ** 30
        self.stats = {}  # of the last generate(): the largest cache (slots per row) and the longest row
        self.tool_min_pixels, self.tool_max_pixels = tool_min_pixels, tool_max_pixels
        self.factor = processor.image_processor.patch_size * processor.image_processor.merge_size
        self.image_token_id = model.config.image_token_id
        ids = lambda t: self.tok.convert_tokens_to_ids(t)
        self.im_end, self.tool_end = ids("<|im_end|>"), ids("</tool_call>")
        self.im_start, self.vision_start = ids("<|im_start|>"), ids("<|vision_start|>")
        self.control_strings = [t.content for t in self.tok.added_tokens_decoder.values() if t.special] + ["<image>"]
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

    def observation(self, result):
        """(the result, (ids, pixels, grids)) of a tool result's observation chunk. Text that spells a control
        token, or a chunk whose control tokens do not match its template and images, is replaced by the plain
        invalid-call text: never the case with our tools, which echo no model text (docs/spec.md §2)."""
        texts = [part["text"] for part in result.content if part["type"] == "text"]
        if not any(c in t for t in texts for c in self.control_strings):
            encoded = self.encode(self.observation_chunk(result), result.images)
            if self.clean_observation(encoded[0], encoded[2], len(result.images)):
                return result, encoded
        plain = tools.ToolResult(False, result.name, result.arguments, "unsafe observation",
                                 [{"type": "text", "text": tools.INVALID}], [])
        return plain, self.encode(self.observation_chunk(plain), [])

    def clean_observation(self, ids, grids, n_images):
        """An observation chunk holds exactly the control tokens of its template and its images' tokens: a model
        that spells a control token in its call must not get it back as one (it would end the turn, or make
        the next forward fail with more image tokens than images)."""
        count = lambda t: sum(i == t for i in ids)  # noqa: E731
        image_tokens = 0 if grids is None else int((grids.prod(-1) // common.MERGE ** 2).sum())
        return (count(self.image_token_id) == image_tokens and count(self.vision_start) == n_images
                and count(self.im_start) == 2 and count(self.im_end) == 2)

    def observation_chunk(self, result):
        user = self.processor.apply_chat_template([{"role": "user", "content": result.content}], tokenize=False)
        return "<|im_end|>\n" + user + "<|im_start|>assistant\n"  # user = <|im_start|>user\n...<|im_end|>\n

    @torch.no_grad()
    def generate(self, prompts, n_samples=1, temperature=0.0, top_p=1.0, max_new_tokens=512,
                 max_response_tokens=2048, seed=0, logits_hook=None, keep_logits=False):
        """prompts: dicts with messages, prompt_images (placeholder order, prompt resolution), tool_images
        (0 = query or None, i = candidate i, original resolution) and optionally key (what seeds its samples,
        e.g. the qid; else its index in the list). Returns n_samples trajectories per prompt, prompt-major.
        logits_hook(row, logits) may edit a row's logits before sampling (tests)."""
        encoded = [self.encode_prompt(p) for p in prompts]
        # rectangular_slots: what a cache padding every row to each step's widest chunk would hold (for bench.py)
        self.stats = {"kv_slots_per_row": 0, "longest_row": 0, "chunks": 0, "rectangular_slots": 0}
        out = []
        with unsharded(self.model), sdpa_attention(self.model):  # FSDP: gather the weights once, no collective after
            for chunk in self.chunks(encoded, n_samples, max_response_tokens):
                rows = [Row(p, g, encoded[p][0], prompts[p]["prompt_images"], encoded[p][2], encoded[p][4],
                            row_generator(seed, prompts[p].get("key", p), g)) for p in chunk for g in range(n_samples)]
                self.run_rows(rows, [encoded[p] for p in chunk], n_samples, prompts, temperature, top_p, max_new_tokens,
                              max_response_tokens, logits_hook, keep_logits)
                out += [self.trajectory(row) for row in rows]
                self.stats["longest_row"] = max([self.stats["longest_row"]] + [len(row.ids) for row in rows])
                self.stats["chunks"] += 1
        return out

    def encode_prompt(self, prompt):
        """(ids, pixels, grids as a list, positions (3, L), next free position) of one prompt."""
        text = self.processor.apply_chat_template(prompt["messages"], add_generation_prompt=True, tokenize=False)
        ids, pixels, grids = self.encode(text, prompt["prompt_images"])
        pos, next_pos = mrope_positions(ids, grids, self.image_token_id, 0)
        return ids, pixels, [] if grids is None else grids.tolist(), pos, next_pos

    def chunks(self, encoded, n_samples, max_response_tokens):
        """Prompt indices in chunks whose rows' worst-case KV (prompt + response budget, each sample a copy of
        its prompt's cache) fits the budget; a group is never split, and a group over the budget runs alone."""
        chunks, current, used = [], [], 0
        for p, (ids, *_) in enumerate(encoded):
            need = n_samples * (len(ids) + max_response_tokens) * self.kv_bytes_per_token
            if current and used + need > self.kv_budget_bytes:
                chunks.append(current)
                current, used = [], 0
            current.append(p)
            used += need
        return chunks + [current] if current else chunks

    def run_rows(self, rows, encoded, n_samples, prompts, temperature, top_p, max_new_tokens, max_response_tokens,
                 logits_hook, keep_logits):
        """Generate one chunk: prefill its prompts once, copy each for its samples, then step until every row ends."""
        model, dev = self.model, self.device
        width = max(len(e[0]) for e in encoded)
        input_ids = torch.full((len(encoded), width), self.pad_id, dtype=torch.long)
        position_ids = torch.zeros(3, len(encoded), width, dtype=torch.long)
        for p, (ids, _, _, pos, _) in enumerate(encoded):  # right-padded: row p's real tokens are slots [0, len)
            input_ids[p, :len(ids)] = torch.tensor(ids)
            position_ids[:, p, :len(ids)] = pos
        pixels = [e[1] for e in encoded if e[1] is not None]
        grids = [torch.tensor(e[2]) for e in encoded if e[2]]
        cache = RaggedCache(model.config.get_text_config().num_hidden_layers)
        cache.lengths = torch.zeros(len(encoded), dtype=torch.long)
        lengths = torch.tensor([len(e[0]) for e in encoded])
        out = model(input_ids=input_ids.to(dev), position_ids=position_ids.to(dev),
                    attention_mask=ragged_mask(cache.lengths, width, self.mask_dtype, dev),
                    pixel_values=torch.cat(pixels).to(dev, model.dtype) if pixels else None,
                    image_grid_thw=torch.cat(grids).to(dev) if grids else None,
                    past_key_values=cache, use_cache=True, logits_to_keep=torch.unique(lengths - 1).to(dev))
        keep = torch.unique(lengths - 1)
        logits = out.logits[torch.arange(len(encoded)), torch.searchsorted(keep, lengths - 1).to(dev)]  # (P, V)
        cache.lengths = lengths
        cache.batch_repeat_interleave(n_samples)
        rectangular = width
        logits = logits.repeat_interleave(n_samples, dim=0)  # (B, V), B = prompts x samples
        active = list(range(len(rows)))  # rows[active[b]] is batch row b
        while active:
            # sample one token for every active row, then decide what each row feeds next
            logits = logits.float()
            raw = logits.cpu().clone() if keep_logits else None  # what the model computed, before masking
            logits[:, self.banned] = -float("inf")
            if logits_hook is not None:
                logits = torch.stack([logits_hook(rows[r], logits[b]) for b, r in enumerate(active)])
            tokens = sample(logits, temperature, top_p, [rows[r].generator for r in active]).tolist()  # (B,)
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
                cache.batch_select_indices(torch.tensor(keep, device=dev))
                active = [active[b] for b in keep]
            logits, step_width = self.forward_step([rows[r] for r in active], cache)
            rectangular += step_width
            self.stats["rectangular_slots"] = max(self.stats["rectangular_slots"], rectangular)

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
                                             self.tool_max_pixels, self.factor, style=prompt.get("style", "release"))
            row.tool_calls.append({"name": result.name, "arguments": result.arguments, "valid": result.valid,
                                   "error": result.error})
            if len(row.tool_calls) > self.max_calls:
                row.stop_reason = "max_calls"  # run and recorded, but nothing more is generated
                return False
            result, (ids, pixels, grids) = self.observation(result)
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

    def forward_step(self, batch_rows, cache):
        """One forward for all active rows: each feeds its pending observation chunk or its last token, written
        at its own offset in the cache; returns each row's next-token logits (B, V) and the step's width."""
        dev, model = self.device, self.model
        if all(row.pending is None for row in batch_rows):  # the common step: every row decodes one token
            input_ids = torch.tensor([[row.ids[-1]] for row in batch_rows], device=dev)  # (B, 1)
            position_ids = torch.tensor([row.next_pos for row in batch_rows], device=dev).view(1, -1, 1).expand(3, -1, 1)
            for row in batch_rows:
                row.next_pos += 1
            out = model(input_ids=input_ids, position_ids=position_ids, past_key_values=cache, use_cache=True,
                        attention_mask=ragged_mask(cache.lengths, 1, self.mask_dtype, dev), logits_to_keep=1)
            cache.lengths = cache.lengths + 1
            self.stats["kv_slots_per_row"] = max(self.stats["kv_slots_per_row"], cache.capacity())
            return out.logits[:, -1], 1
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
        for b, (ids, pos, _, _) in enumerate(chunks):
            input_ids[b, :len(ids)] = torch.tensor(ids)
            position_ids[:, b, :len(ids)] = pos
        pixels = [c[2] for c in chunks if c[2] is not None]
        grids = [c[3] for c in chunks if c[3] is not None]
        fed = torch.tensor([len(c[0]) for c in chunks])  # (B,) real tokens per row
        keep = torch.unique(fed - 1)  # the LM head runs only where some row needs its logits
        out = model(input_ids=input_ids.to(dev), position_ids=position_ids.to(dev),
                    attention_mask=ragged_mask(cache.lengths, width, self.mask_dtype, dev),
                    pixel_values=torch.cat(pixels).to(dev, model.dtype) if pixels else None,
                    image_grid_thw=torch.cat(grids).to(dev) if grids else None,
                    past_key_values=cache, use_cache=True, logits_to_keep=keep.to(dev))
        cache.lengths = cache.lengths + fed  # only the real tokens count: the pads get overwritten
        self.stats["kv_slots_per_row"] = max(self.stats["kv_slots_per_row"], cache.capacity())
        return out.logits[torch.arange(len(chunks), device=dev), torch.searchsorted(keep, fed - 1).to(dev)], width

    @property
    def mask_dtype(self):
        """None: a boolean mask (SDPA); else the dtype of an additive mask (eager attention)."""
        impl = self.model.config.get_text_config()._attn_implementation
        return None if impl in ("sdpa", None) else self.model.dtype

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


@contextlib.contextmanager
def sdpa_attention(model):
    """The ragged cache needs a per-row 4D mask, which flash-attention kernels do not take: generation runs
    the language model with PyTorch SDPA (on GPU its memory-efficient kernel), training keeps the model's own."""
    text = model.config.get_text_config()
    before = text._attn_implementation
    if before in ("sdpa", "eager", None):
        yield
        return
    model.set_attn_implementation({"text_config": "sdpa"} if text is not model.config else "sdpa")
    try:
        yield
    finally:
        model.set_attn_implementation({"text_config": before} if text is not model.config else before)


def sample(logits, temperature, top_p, generators):
    """(B, V) logits -> (B,) tokens: greedy at temperature 0, else temperature + nucleus (top-p) sampling,
    row b drawing with generators[b]."""
    if temperature <= 0:
        return torch.argmax(logits, dim=-1)
    probs = torch.softmax(logits / temperature, dim=-1)
    if top_p < 1.0:
        sorted_probs, order = torch.sort(probs, dim=-1, descending=True)
        outside = torch.cumsum(sorted_probs, -1) - sorted_probs > top_p  # keep the smallest set reaching top_p
        sorted_probs[outside] = 0
        probs = torch.zeros_like(probs).scatter(-1, order, sorted_probs)
    probs = probs.cpu()
    return torch.cat([torch.multinomial(probs[b], 1, generator=g) for b, g in enumerate(generators)])
