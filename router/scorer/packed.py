"""The scorer's forward pass without wasted work: a batch of prompts packed into one sequence, no padding.

A padded batch costs its size times its longest prompt; packed, it costs the sum of its prompts. Every prompt a
chat template renders also starts with the same tokens (SmolLM2's template inserts a default system prompt):
their keys and values are computed once, when the scorer loads, and each prompt that starts with them attends to
them instead of recomputing them. With ``last`` pooling the deepest block runs only at each prompt's last
position, the one the feature reads. The result is the model's own forward pass (the tests compare it with
transformers' padded pass), so features, and the probes trained on them, do not change.

It reuses the model's own modules (embeddings, norms, rotary embedding, projections, activation); it supports the
decoder layout of Llama and Qwen2 (``PackedDecoder.supports``). Other architectures run transformers' padded pass.

An early exit (``PackedDecoder.staged_features``): a prompt may ask for its features at a shallower block too, and
for a decision there (``router.scorer.interface.EarlyExit``). The whole batch runs up to that block, each asking
prompt's features there are pooled as the configured ones are and handed to its decision; the prompts that stop
leave the pass (the rows of those that go on are packed anew, their states kept), and the blocks after run only
for the others. A prompt that goes on pays one more pooling of the early block's rows and, if others stopped, a
copy of its rows; its features are those of the plain pass (bit for bit when no prompt of its batch stopped).

A long prompt may run in chunks (``router.scorer.interface.Chunk``, ``scorer.chunk_tokens``), one pass each, so
that other prompts' passes run between them: a chunk attends to the shared prefix's keys and values (where the
prompt continues it), to those of the prompt's earlier chunks, kept between passes as the prefix's are (``_Past``:
per block, room for the whole prompt's; 2 × blocks × kv width × tokens × 4 bytes in float32, 23.6 MB for
SmolLM2-135M's 15 blocks at 1,024 tokens), and causally to its own. Only the last chunk pools: ``last`` reads its
last position; ``mean`` adds the sums of the earlier chunks' pooled states, kept per probed layer, as it adds the
prefix's. The features are the unchunked pass's (within float32's rounding: the tests compare them). A chunked
prompt takes no early exit: its earlier chunks need every block, and it is scored in full.
"""

from __future__ import annotations

import logging
from collections.abc import Sequence
from dataclasses import dataclass, field

import numpy as np
import torch
import torch.nn.functional as F

from router.scorer.cpu import native_cpu_dtype
from router.scorer.interface import Chunk, EarlyExit

log = logging.getLogger(__name__)

SUPPORTED_MODEL_TYPES = ("llama", "qwen2")

Piece = Sequence[int] | Chunk  # a whole prompt's token ids, or a chunk of a long one


@dataclass(frozen=True)
class _Prefix:
    """The shared prefix's token ids, its keys and values per block, and its pooled-state sums per probed layer."""

    ids: list[int]
    keys: list[torch.Tensor]  # per block: (kv_heads, len, head_dim), rotary applied
    values: list[torch.Tensor]
    sums: dict[int, torch.Tensor]  # block -> sum over the prefix of its (normed) states, float32


@dataclass(eq=False)
class _Past:
    """A long prompt's pass between its chunks: per block, the keys and values of its tokens run so far (the shared
    prefix's copied in first where it continues it), in room for all its tokens; the sums of its pooled states so
    far per probed layer (``mean`` pooling)."""

    length: int  # the prompt's tokens
    prefixed: bool  # continues the shared prefix (whose keys and values fill the first ``skip`` places)
    skip: int  # tokens not computed: the shared prefix's where it continues it, else 0
    done: int  # tokens whose keys and values are kept (the end of the chunk run last)
    keys: list[torch.Tensor]  # per block: (kv_heads, length, head_dim), rotary applied
    values: list[torch.Tensor]
    sums: dict[int, torch.Tensor] = field(default_factory=dict)

    @property
    def nbytes(self) -> int:
        return sum(t.element_size() * t.nelement() for t in (*self.keys, *self.values))


@dataclass(frozen=True)
class _Packing:
    """Where each prompt's tokens sit in the packed sequence, and whether it continues the shared prefix; for a
    chunk, its prompt's ``_Past`` and how many of the prompt's tokens come before its own (``seen``)."""

    starts: list[int]
    ends: list[int]
    prefixed: list[bool]  # a whole prompt that continues the shared prefix (a chunk's ``_Past`` says for it)
    shared: int = 0  # length of the shared prefix the prefixed prompts continue
    padding: int = 0  # rows after the last prompt's, in no prompt (``padded_rows``)
    pasts: list[_Past | None] = field(default_factory=list)  # per prompt; empty: no chunk in the batch
    seen: list[int] = field(default_factory=list)

    @property
    def last_rows(self) -> torch.Tensor:
        return torch.tensor([e - 1 for e in self.ends], dtype=torch.long)

    def past(self, place: int) -> _Past | None:
        return self.pasts[place] if self.pasts else None

    def masks(self) -> list[torch.Tensor | None]:
        """Per prompt, which keys each of its positions sees when keys come before its own (the shared prefix's,
        a chunk's earlier ones): all of those, then causal among its own; None where plain causal attention does.
        Built once a pass."""
        out: list[torch.Tensor | None] = []
        for place, (start, end, pre) in enumerate(zip(self.starts, self.ends, self.prefixed, strict=True)):
            before = self.seen[place] if self.past(place) is not None else self.shared if pre else 0
            if not before:
                out.append(None)
                continue
            n = end - start
            mask = torch.ones(n, before + n, dtype=torch.bool)
            mask[:, before:] = torch.ones(n, n, dtype=torch.bool).tril()
            out.append(mask)
        return out


class PackedDecoder:
    """Runs the first ``depth`` blocks of a loaded decoder (transformers ``*Model``) over packed prompts."""

    @staticmethod
    def supports(model: torch.nn.Module) -> bool:
        cfg = model.config
        return (getattr(cfg, "model_type", None) in SUPPORTED_MODEL_TYPES
                and not getattr(cfg, "use_sliding_window", False))

    def __init__(self, model: torch.nn.Module, *, layers: Sequence[int], pooling: str,
                 final_norm: torch.nn.Module | None, prefix: Sequence[int]) -> None:
        cfg = model.config
        self.depth = max(layers)
        self.layers = tuple(layers)
        self.pooling = pooling
        self.final_norm = final_norm
        self.embed = model.embed_tokens
        self.rotary = model.rotary_emb
        self.blocks = list(model.layers[:self.depth])
        self.heads, self.kv_heads = cfg.num_attention_heads, cfg.num_key_value_heads
        self.head_dim = getattr(cfg, "head_dim", None) or cfg.hidden_size // cfg.num_attention_heads
        # One matrix product for q, k and v, and one for the gate and up projections: the modules' parameters
        # become views of the fused ones, so the weights are held once (on a CPU: and once more in oneDNN's
        # layout, ``PrepackedLinear``).
        prepack = PrepackedLinear.suits(model)
        project = PrepackedLinear if prepack else (lambda linear: linear)
        self.qkv = [project(_fuse(b.self_attn.q_proj, b.self_attn.k_proj, b.self_attn.v_proj)) for b in self.blocks]
        self.gate_up = [project(_fuse(b.mlp.gate_proj, b.mlp.up_proj)) for b in self.blocks]
        self.o = [project(b.self_attn.o_proj) for b in self.blocks]
        self.down = [project(b.mlp.down_proj) for b in self.blocks]
        self.prefix = self.prefix_state(list(prefix)) if prefix else None
        self.round_rows = True  # pad the packed rows to ``padded_rows`` (few distinct matrix shapes)

    @torch.inference_mode()
    def features(self, batch: Sequence[Piece]) -> torch.Tensor:
        """Token ids (one list per prompt) → pooled features, (len(batch), feature_dim), float32. A chunk that is
        not its prompt's last (``Chunk.last``) has a row that means nothing."""
        token_ids, positions, packing = self._pack(batch)
        pooled = self._run(token_ids, positions, packing, prefix=self.prefix)
        return torch.cat([pooled[layer] for layer in self.layers], dim=-1)

    @torch.inference_mode()
    def staged_features(self, batch: Sequence[Piece], exits: Sequence[EarlyExit | None]
                        ) -> list[tuple[np.ndarray | None, np.ndarray | None]]:
        """Per prompt, (its features at its early exit's layer, its configured features): the first None where it
        asked for no exit, the second where its exit stopped the pass, and both for a chunk that is not its
        prompt's last. Each exit's layer must come before the deepest configured layer (``exit_layers``); a chunk
        takes no exit."""
        if len(exits) != len(batch):
            raise ValueError(f"{len(exits)} exits for {len(batch)} prompts")
        for e, piece in zip(exits, batch, strict=True):
            if e is not None and e.layer not in self.exit_layers:
                raise ValueError(f"an early exit at layer {e.layer}: this pass stops early at layers 1 to "
                                 f"{self.depth - 1}")
            if e is not None and isinstance(piece, Chunk):
                raise ValueError("a chunk of a long prompt takes no early exit")
        p = self.prefix
        token_ids, positions, packing = self._pack(batch)
        x = self.embed(token_ids)
        cos, sin = self._rotary(x, positions)
        masks = packing.masks()
        live = list(range(len(batch)))  # the prompt (index in ``batch``) at each place of the packing
        kept: list[dict[int, torch.Tensor]] = [{} for _ in batch]  # configured layer -> pooled row
        early: list[np.ndarray | None] = [None] * len(batch)
        stopped = [False] * len(batch)
        last_only = self.pooling == "last"
        for index in range(len(self.blocks)):
            depth = index + 1
            trimmed = last_only and depth == self.depth
            x = self._block(index, x, cos, sin, packing, masks, p, trimmed, None)
            asking = [place for place, i in enumerate(live) if (e := exits[i]) is not None and e.layer == depth]
            if depth not in self.layers and not asking:
                continue
            pooled = self._pool(depth, x, packing, p, trimmed, False)
            if depth in self.layers:
                for place, i in enumerate(live):
                    kept[i][depth] = pooled[place]
            leaving = set()
            for place in asking:
                i = live[place]
                early[i] = pooled[place].numpy().copy()
                if _decide(exits[i], early[i]):  # type: ignore[arg-type]
                    leaving.add(place)
                    stopped[i] = True
            if leaving:
                staying = [place for place in range(len(live)) if place not in leaving]
                if not staying:
                    break
                x, cos, sin, packing = self._repack(x, cos, sin, packing, staying)
                masks = packing.masks()
                live = [live[place] for place in staying]
        return [(None, None) if isinstance(piece, Chunk) and not piece.last
                else (early[i], None if stopped[i] else torch.cat([kept[i][layer] for layer in self.layers]).numpy())
                for i, piece in enumerate(batch)]

    @property
    def exit_layers(self) -> range:
        """The layers an early exit may stop at: those before the deepest configured one."""
        return range(1, self.depth)

    def _pack(self, batch: Sequence[Piece]) -> tuple[torch.Tensor, torch.Tensor, _Packing]:
        """The batch's token ids packed into one sequence (each prompt that continues the shared prefix without
        it; a chunk's own tokens), their positions, and where each prompt sits."""
        p = self.prefix
        skip = len(p.ids) if p is not None else 0
        prefixed, firsts, tails = [], [], []  # per piece: continues the prefix (whole prompts), first position, ids
        pasts: list[_Past | None] = []
        for piece in batch:
            if isinstance(piece, Chunk):
                past = self._past(piece)
                first = max(piece.start, past.skip)
                prefixed.append(False)
                tails.append([int(t) for t in piece.ids[first:piece.end]])
            else:
                past = None
                pre = p is not None and len(piece) > skip and [int(t) for t in piece[:skip]] == p.ids
                first = skip if pre else 0
                prefixed.append(pre)
                tails.append([int(t) for t in piece[first:]])
            firsts.append(first)
            pasts.append(past)
        ends, total = [], 0
        for tail in tails:
            total += len(tail)
            ends.append(total)
        padding = padded_rows(total) - total if self.round_rows else 0
        chunked = any(past is not None for past in pasts)
        packing = _Packing(starts=[e - len(t) for e, t in zip(ends, tails, strict=True)], ends=ends,
                           prefixed=prefixed, shared=skip, padding=padding, pasts=pasts if chunked else [],
                           seen=firsts if chunked else [])
        token_ids = torch.tensor([t for tail in tails for t in tail] + [0] * padding, dtype=torch.long)
        positions = torch.cat([torch.arange(first, first + len(tail))
                               for tail, first in zip(tails, firsts, strict=True)]
                              + [torch.zeros(padding, dtype=torch.long)])
        return token_ids, positions, packing

    def _past(self, chunk: Chunk) -> _Past:
        """The chunk's prompt's pass so far (made at its first chunk, in ``chunk.state``), checked to end where the
        chunk starts; marked as run up to the chunk's end."""
        if not 0 <= chunk.start < chunk.end <= len(chunk.ids):
            raise ValueError(f"a chunk of tokens {chunk.start} to {chunk.end} of a prompt of {len(chunk.ids)}")
        past = chunk.state
        if past is None:
            if chunk.start:
                raise ValueError(f"a prompt's first chunk starts at token {chunk.start}, not 0")
            p = self.prefix
            skip = len(p.ids) if p is not None else 0
            # where the first chunk ends inside the prefix, the prompt is computed whole, without it
            prefixed = p is not None and chunk.end > skip and [int(t) for t in chunk.ids[:skip]] == p.ids
            dtype = self.embed.weight.dtype
            shape = (self.kv_heads, len(chunk.ids), self.head_dim)
            keys = [torch.empty(shape, dtype=dtype) for _ in self.blocks]
            values = [torch.empty(shape, dtype=dtype) for _ in self.blocks]
            if prefixed and p is not None:
                for index in range(len(self.blocks)):
                    keys[index][:, :skip] = p.keys[index]
                    values[index][:, :skip] = p.values[index]
            past = chunk.state = _Past(length=len(chunk.ids), prefixed=prefixed, skip=skip if prefixed else 0,
                                       done=0, keys=keys, values=values)
        elif not isinstance(past, _Past) or past.length != len(chunk.ids):
            raise ValueError("a chunk's state is not its prompt's pass")
        elif chunk.start != past.done:
            raise ValueError(f"a chunk starts at token {chunk.start}, its prompt's pass has run up to {past.done}: "
                             "a prompt's chunks run in order, each once")
        past.done = chunk.end
        return past

    def _repack(self, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor, packing: _Packing,
                staying: list[int]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, _Packing]:
        """The rows (states, rotary tables) of the prompts at places ``staying`` packed anew, padded again."""
        rows = torch.cat([torch.arange(packing.starts[place], packing.ends[place]) for place in staying])
        ends, total = [], 0
        for place in staying:
            total += packing.ends[place] - packing.starts[place]
            ends.append(total)
        padding = padded_rows(total) - total if self.round_rows else 0
        repacked = _Packing(starts=[e - (packing.ends[place] - packing.starts[place])
                                    for e, place in zip(ends, staying, strict=True)],
                            ends=ends, prefixed=[packing.prefixed[place] for place in staying],
                            shared=packing.shared, padding=padding,
                            pasts=[packing.pasts[place] for place in staying] if packing.pasts else [],
                            seen=[packing.seen[place] for place in staying] if packing.pasts else [])
        x, cos, sin = x[rows], cos[rows], sin[rows]
        if padding:  # padding rows attend to nothing and are read by no prompt: any finite values do
            x = torch.cat([x, x.new_zeros(padding, x.shape[1])])
            cos = torch.cat([cos, cos[:1].expand(padding, -1, -1)])
            sin = torch.cat([sin, sin[:1].expand(padding, -1, -1)])
        return x, cos, sin, repacked

    def _rotary(self, x: torch.Tensor, positions: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """cos and sin of the rotary embedding, (rows, 1, head_dim): one row per token, across heads."""
        cos, sin = self.rotary(x[None], positions[None])
        return cos[0, :, None], sin[0, :, None]

    def prefix_state(self, ids: list[int]) -> _Prefix:
        """The shared prefix run once: its keys and values at every block, its pooled-state sums."""
        keys: list[torch.Tensor] = []
        values: list[torch.Tensor] = []
        packing = _Packing(starts=[0], ends=[len(ids)], prefixed=[False])
        with torch.inference_mode():
            sums = self._run(torch.tensor(ids, dtype=torch.long), torch.arange(len(ids)), packing, prefix=None,
                             keep_kv=(keys, values), sums_only=True)
        return _Prefix(ids=ids, keys=keys, values=values, sums={k: v[0] for k, v in sums.items()})

    def _run(self, token_ids: torch.Tensor, positions: torch.Tensor, packing: _Packing, *, prefix: _Prefix | None,
             keep_kv: tuple[list[torch.Tensor], list[torch.Tensor]] | None = None,
             sums_only: bool = False) -> dict[int, torch.Tensor]:
        x = self.embed(token_ids)
        cos, sin = self._rotary(x, positions)
        masks = packing.masks()
        pooled: dict[int, torch.Tensor] = {}
        last_only = self.pooling == "last" and keep_kv is None
        for index in range(len(self.blocks)):
            depth = index + 1
            trimmed = last_only and depth == self.depth
            x = self._block(index, x, cos, sin, packing, masks, prefix, trimmed, keep_kv)
            if depth in self.layers or sums_only:  # the prefix's sums at every block: any may be an early exit
                pooled[depth] = self._pool(depth, x, packing, prefix, trimmed, sums_only)
        return pooled

    def _block(self, index: int, x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
               packing: _Packing, masks: list[torch.Tensor | None], prefix: _Prefix | None, trimmed: bool,
               keep_kv: tuple[list[torch.Tensor], list[torch.Tensor]] | None) -> torch.Tensor:
        q, k, v = self._attention_inputs(index, x, cos, sin)
        if keep_kv is not None:
            keep_kv[0].append(k[0])
            keep_kv[1].append(v[0])
        outputs = []
        for place, (start, end, mask) in enumerate(zip(packing.starts, packing.ends, masks, strict=True)):
            keys, values = k[:, :, start:end], v[:, :, start:end]
            if (past := packing.past(place)) is not None:  # a chunk: its keys join its prompt's earlier ones
                seen = packing.seen[place]
                upto = seen + end - start
                past.keys[index][:, seen:upto] = keys[0]
                past.values[index][:, seen:upto] = values[0]
                keys, values = past.keys[index][None, :, :upto], past.values[index][None, :, :upto]
            elif mask is not None and prefix is not None:
                keys = torch.cat([prefix.keys[index][None], keys], dim=2)
                values = torch.cat([prefix.values[index][None], values], dim=2)
            if trimmed:  # the last position sees every key: no mask
                out = F.scaled_dot_product_attention(q[:, :, end - 1:end], keys, values, enable_gqa=True)
            elif mask is None:
                out = F.scaled_dot_product_attention(q[:, :, start:end], keys, values, is_causal=True,
                                                     enable_gqa=True)
            else:
                out = F.scaled_dot_product_attention(q[:, :, start:end], keys, values, attn_mask=mask,
                                                     enable_gqa=True)
            outputs.append(out[0].transpose(0, 1).reshape(-1, self.heads * self.head_dim))
        if packing.padding and not trimmed:  # padding rows attend to nothing
            outputs.append(x.new_zeros(packing.padding, self.heads * self.head_dim))
        return self._residual_and_mlp(index, x[packing.last_rows] if trimmed else x, torch.cat(outputs))

    def _attention_inputs(self, index: int, x: torch.Tensor, cos: torch.Tensor,
                          sin: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """A block's q, k (rotary applied) and v for every row, each (1, heads, rows, head_dim)."""
        rows = x.shape[0]
        qkv = self.qkv[index](self.blocks[index].input_layernorm(x))
        q_width, kv_width = self.heads * self.head_dim, self.kv_heads * self.head_dim
        # the rotary embedding of q and k in one go: (rows, heads + kv_heads, head_dim)
        qk = rotate(qkv[:, :q_width + kv_width].view(rows, self.heads + self.kv_heads, self.head_dim), cos, sin)
        q = qk[:, :self.heads].transpose(0, 1)[None]
        k = qk[:, self.heads:].transpose(0, 1)[None]
        v = qkv[:, q_width + kv_width:].view(rows, self.kv_heads, self.head_dim).transpose(0, 1)[None]
        return q, k, v

    def _residual_and_mlp(self, index: int, x: torch.Tensor, attended: torch.Tensor) -> torch.Tensor:
        """The rest of a block after attention: output projection, residual, MLP, residual."""
        x = x + self.o[index](attended)
        gate, up = self.gate_up[index](self.blocks[index].post_attention_layernorm(x)).chunk(2, dim=-1)
        return x + self.down[index](self.blocks[index].mlp.act_fn(gate).mul_(up))

    def _pool(self, depth: int, x: torch.Tensor, packing: _Packing, prefix: _Prefix | None, trimmed: bool,
              sums_only: bool) -> torch.Tensor:
        states = (self.final_norm(x) if self.final_norm is not None else x).to(torch.float32)
        if sums_only:
            return states.sum(dim=0, keepdim=True)
        parts = []
        if self.pooling in ("last", "last+mean"):
            parts.append(states if trimmed else states[packing.last_rows])
        if self.pooling in ("mean", "last+mean"):
            means = []
            for place, (start, end, pre) in enumerate(zip(packing.starts, packing.ends, packing.prefixed,
                                                          strict=True)):
                total, count = states[start:end].sum(dim=0), end - start
                if (past := packing.past(place)) is not None:
                    if packing.seen[place] + count < past.length:  # not its prompt's last chunk: summed for it
                        if depth in self.layers:
                            past.sums[depth] = past.sums[depth] + total if depth in past.sums else total
                    else:  # its last: the earlier chunks' sums and the prefix's join its own
                        if depth in past.sums:
                            total = total + past.sums[depth]
                        if past.prefixed and prefix is not None:
                            total = total + prefix.sums[depth]
                        count = past.length
                elif pre and prefix is not None:
                    total, count = total + prefix.sums[depth], count + len(prefix.ids)
                means.append(total / count)
            parts.append(torch.stack(means))
        return torch.cat(parts, dim=-1)


def _decide(exit: EarlyExit, features: np.ndarray) -> bool:
    """The exit's decision; one that fails counts as going on (the prompt is scored in full)."""
    try:
        return bool(exit.should_stop(features))
    except Exception:
        log.exception("an early exit's decision failed: the prompt is scored in full")
        return False


def padded_rows(rows: int) -> int:
    """``rows`` rounded up to a multiple of 16, or of a 16th of the largest power of two up to it (≤ 1/16 more rows).

    oneDNN builds a kernel (a "primitive") for every shape of a matrix product it meets, and caches it. Packed
    rows are the sum of a batch's prompt lengths, so nearly every batch of live traffic has a shape of its own;
    on a 2-core CPU with AMX, the pass over batches it had not met before ran 1.18× as fast with its rows
    rounded (research/perf/README.md). Rounded, the pass meets about 16 shapes per doubling of the row count, which
    oneDNN's cache (1,024 kernels) keeps."""
    step = max(16, 1 << max(0, rows.bit_length() - 5))
    return -(-rows // step) * step


def rotate(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """The rotary position embedding, as transformers' ``apply_rotary_pos_emb`` computes it (same operations, same
    order), on (rows, heads, head_dim) with cos and sin of shape (rows, 1, head_dim)."""
    half = x.shape[-1] // 2
    return x * cos + torch.cat((-x[..., half:], x[..., :half]), dim=-1) * sin


class PrepackedLinear:
    """A linear layer whose weight oneDNN reorders once, at load, into its own blocked layout, instead of the
    kernel reordering (bf16) or reading (MKL, float32) the plain matrix at every call (what torch's compiler does
    when it freezes a model). Same products: float32 to 6e-7 relative, bf16 bit for bit (tests). Measured at the
    pass's shapes (research/perf/README.md): float32 on a 2-core AVX2 CPU 1.45× ``F.linear`` and 1.31× the whole
    pass; bf16 on a 2-core CPU with AMX 1.10× ``F.linear`` and 1.07× the whole pass."""

    ROWS_HINT = 512  # the rows of a typical call (8 prompts of ~80 tokens after the prefix): oneDNN's layout hint

    @staticmethod
    def suits(model: torch.nn.Module, flags: frozenset[str] | None = None) -> bool:
        """float32 on a CPU; bfloat16 on a CPU that multiplies it natively (``flags``: this CPU's by default)."""
        parameter = next(model.parameters())
        if parameter.device.type != "cpu" or not torch.backends.mkldnn.is_available():
            return False
        if parameter.dtype == torch.bfloat16:
            return native_cpu_dtype(flags) == "bfloat16"
        return parameter.dtype == torch.float32

    def __init__(self, linear: torch.nn.Linear) -> None:
        self.weight = linear.weight.detach()  # the plain weight stays readable (and shared with the model's)
        self.bias = linear.bias.detach() if linear.bias is not None else None
        self.packed = torch.ops.mkldnn._reorder_linear_weight(self.weight, self.ROWS_HINT)

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")


def _fuse(*linears: torch.nn.Linear) -> torch.nn.Linear:
    """One linear computing the given ones side by side (same input); their own parameters become views of its."""
    weight = torch.cat([lin.weight.detach() for lin in linears])
    bias = torch.cat([lin.bias.detach() for lin in linears]) if linears[0].bias is not None else None
    fused = torch.nn.Linear(weight.shape[1], weight.shape[0], bias=bias is not None, device="meta")
    fused.weight = torch.nn.Parameter(weight, requires_grad=False)
    if bias is not None:
        fused.bias = torch.nn.Parameter(bias, requires_grad=False)
    row = 0
    for lin in linears:
        rows = lin.weight.shape[0]
        lin.weight = torch.nn.Parameter(weight[row:row + rows], requires_grad=False)
        if bias is not None:
            lin.bias = torch.nn.Parameter(bias[row:row + rows], requires_grad=False)
        row += rows
    return fused
