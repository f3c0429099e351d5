"""Greedy decoding for BLIP-2's OPT language model: static KV cache, CUDA graphs per batch.

Why not `generate`: at captioning batch sizes HF's eager loop spends much of
each of the 30 decode steps in Python and small-kernel launches (dynamic
cache, logits processors, stopping criteria), leaving the GPU idle. Here the
prefill runs eagerly (large GEMMs), and one decode step - embedding, 32
layers reading/writing a preallocated KV cache, logits processors, argmax -
is written with device-side state only (no host syncs), so it can be captured
once as a CUDA graph and replayed per token. On CPU the same step runs
eagerly, which is how CI checks it token-for-token against HF `generate`.

Scope (anything else falls back to HF `generate`): decoder-only OPT, greedy,
one caption per image, repetition penalty and min-new-tokens supported, EOS
handling as HF (finished rows emit the pad token, the loop stops early once
every row finished). Numerics follow HF's OPT; QKV projections are fused, so
results can differ from HF in the last bits (and, rarely, in a tied argmax).
"""

from __future__ import annotations

import logging
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

log = logging.getLogger("ccurate.captioning")

_UNSUPPORTED_GENERATION_FIELDS = (
    "no_repeat_ngram_size",
    "encoder_no_repeat_ngram_size",
    "bad_words_ids",
    "suppress_tokens",
    "begin_suppress_tokens",
    "forced_bos_token_id",
    "forced_eos_token_id",
    "sequence_bias",
    "exponential_decay_length_penalty",
    "renormalize_logits",
)


def supports(model: Any) -> bool:
    """True when `model.language_model` is an OPT decoder this module can run exactly (and
    whose generation config asks for nothing it lacks)."""
    lm: Any = getattr(model, "language_model", None)
    cfg = getattr(lm, "config", None)
    if cfg is None or getattr(cfg, "model_type", None) != "opt":
        return False
    if getattr(cfg, "is_encoder_decoder", False):
        return False
    # the language model's own generation config: what the HF fallback
    # (`language_model.generate`) applies. The checkpoint's top-level one
    # (`model.generation_config`, from generation_config.json) is applied by neither path
    # (HF's `Blip2ForConditionalGeneration.generate` ignores it too) beyond the EOS and pad
    # ids `Blip2Captioner` takes from it, so its fields must not cost the fast path
    gen = getattr(lm, "generation_config", None)
    if gen is not None:
        for name in _UNSUPPORTED_GENERATION_FIELDS:
            if getattr(gen, name, None):
                return False
    try:
        layers = lm.model.decoder.layers
        _ = layers[0].self_attn.q_proj, layers[0].fc1, lm.lm_head
    except (AttributeError, IndexError):
        return False
    return True


@dataclass
class _Layer:
    ln1: tuple[torch.Tensor | None, torch.Tensor | None]
    qkv_w: torch.Tensor
    qkv_b: torch.Tensor | None
    out_w: torch.Tensor
    out_b: torch.Tensor | None
    ln2: tuple[torch.Tensor | None, torch.Tensor | None]
    fc1_w: torch.Tensor
    fc1_b: torch.Tensor | None
    fc2_w: torch.Tensor
    fc2_b: torch.Tensor | None


@dataclass
class _State:
    """Static buffers for one (batch, prompt, settings) shape; its graph records their addresses."""

    batch: int
    prompt_len: int
    max_new: int
    k: torch.Tensor  # [L, B, heads, T, head_dim] (a view into the shared arena)
    v: torch.Tensor
    ids: torch.Tensor  # [B] token fed to the next step
    step: torch.Tensor  # [1] tokens generated so far
    out: torch.Tensor  # [B, max_new] generated tokens (pad after EOS)
    done: torch.Tensor  # [B] bool
    seen: torch.Tensor  # [B, P + max_new] prompt + generated ids (repetition penalty)
    arange: torch.Tensor  # [T]
    graphs: list[Any] | None = None


class GreedyOPT:
    """Greedy decoder over the weights of an `OPTForCausalLM` (shared, plus fused QKV copies)."""

    def __init__(
        self,
        lm: Any,
        eos_ids: list[int],
        pad_id: int,
        use_graphs: bool = True,
        check_every: int = 8,
        per_position: bool = False,
    ) -> None:
        cfg = lm.config
        dec = lm.model.decoder
        self.hidden = int(cfg.hidden_size)
        self.heads = int(cfg.num_attention_heads)
        self.head_dim = self.hidden // self.heads
        self.pre_ln = bool(cfg.do_layer_norm_before)
        self.act = _activation(str(cfg.activation_function))
        first = dec.layers[0]
        self.eps = float(first.self_attn_layer_norm.eps)
        self.layers = [_fuse(layer) for layer in dec.layers]
        self.embed_w = dec.embed_tokens.weight
        self.pos_w = dec.embed_positions.weight
        self.pos_offset = int(getattr(dec.embed_positions, "offset", 2))
        self.project_in = dec.project_in.weight if dec.project_in is not None else None
        self.project_out = dec.project_out.weight if dec.project_out is not None else None
        fln = dec.final_layer_norm
        self.final_ln = (fln.weight, fln.bias) if fln is not None else None
        self.lm_w = lm.lm_head.weight
        self.device = self.embed_w.device
        self.dtype = self.embed_w.dtype
        self.vocab = int(self.lm_w.shape[0])
        self.eos = torch.tensor(sorted(set(eos_ids)), dtype=torch.long, device=self.device)
        self.pad_id = int(pad_id)
        self._eos_cols = torch.zeros(self.vocab, dtype=torch.float32, device=self.device)
        if self.eos.numel():
            self._eos_cols.index_fill_(0, self.eos, float("-inf"))
        self.use_graphs = use_graphs and self.device.type == "cuda"
        # per_position: one graph per decode position, attending to exactly the filled
        # part of the cache (no mask); else one graph for all steps with a position mask.
        # Only the masked single graph has been timed on a GPU so far: it is the default.
        self.per_position = per_position
        self.check_every = max(1, check_every)
        self._states: dict[tuple[int, int, int, int, float], _State] = {}
        self._arena: tuple[torch.Tensor, torch.Tensor] | None = None
        self._pool: Any = None

    # ---- public -----------------------------------------------------------
    def reset(self) -> None:
        """Drop graphs and the KV arena (after an OOM, or to give memory back)."""
        self._states.clear()
        self._arena = None
        self._pool = None

    @torch.inference_mode()
    def generate(
        self,
        inputs_embeds: torch.Tensor,
        input_ids: torch.Tensor,
        max_new_tokens: int,
        min_new_tokens: int = 0,
        repetition_penalty: float = 1.0,
    ) -> torch.Tensor:
        """Greedy tokens [B, max_new_tokens] for prompts given as embeddings (+ their ids).

        `input_ids` ([P] or [B, P]) only feed the repetition penalty, as in HF
        where the penalty also covers the prompt (image placeholder ids included).
        """
        b, p, _ = inputs_embeds.shape
        if input_ids.dim() == 1:
            input_ids = input_ids.unsqueeze(0)
        st = self._state(b, p, max_new_tokens, min_new_tokens, repetition_penalty)
        st.out.fill_(self.pad_id)
        st.done.zero_()
        st.seen[:, :p].copy_(input_ids.to(self.device).expand(b, p))
        st.seen[:, p:].copy_(st.seen[:, :1].expand(b, max_new_tokens))
        st.step.zero_()

        logits = self._prefill(inputs_embeds, st)
        self._select(logits, st, min_new_tokens, repetition_penalty)
        st.step.fill_(1)
        for i in range(1, max_new_tokens):
            if st.graphs:
                st.graphs[0 if len(st.graphs) == 1 else i - 1].replay()
            else:
                pos = p - 1 + i if self.per_position else None
                self._step(st, min_new_tokens, repetition_penalty, pos)
            if (
                self.eos.numel()
                and i >= min_new_tokens
                and i % self.check_every == 0
                and bool(st.done.all())
            ):
                break
        return st.out.clone()

    # ---- state / graphs ---------------------------------------------------
    def _state(self, b: int, p: int, max_new: int, min_new: int, rep: float) -> _State:
        key = (b, p, max_new, min_new, rep)
        st = self._states.get(key)
        if st is not None:
            return st
        t = p + max_new - 1
        n_layers = len(self.layers)
        arena = self._arena
        if arena is None or arena[0].shape[1] < b or arena[0].shape[3] < t:
            big_b = max(b, arena[0].shape[1]) if arena is not None else b
            big_t = max(t, arena[0].shape[3]) if arena is not None else t
            self.reset()  # graphs point into the old arena
            shape = (n_layers, big_b, self.heads, big_t, self.head_dim)
            arena = (
                torch.zeros(shape, dtype=self.dtype, device=self.device),
                torch.zeros(shape, dtype=self.dtype, device=self.device),
            )
            self._arena = arena
        dev = self.device
        st = _State(
            batch=b,
            prompt_len=p,
            max_new=max_new,
            k=arena[0][:, :b, :, :t],
            v=arena[1][:, :b, :, :t],
            ids=torch.zeros(b, dtype=torch.long, device=dev),
            step=torch.zeros(1, dtype=torch.long, device=dev),
            out=torch.full((b, max_new), self.pad_id, dtype=torch.long, device=dev),
            done=torch.zeros(b, dtype=torch.bool, device=dev),
            seen=torch.zeros(b, p + max_new, dtype=torch.long, device=dev),
            arange=torch.arange(t, device=dev),
        )
        if self.use_graphs and max_new > 1:
            st.graphs = self._capture(st, min_new, rep)
        self._states[key] = st
        return st

    def _capture(self, st: _State, min_new: int, rep: float) -> list[Any] | None:
        """Record the decode step(s); warm-up runs on a side stream as CUDA graphs require.

        Graphs share one memory pool: they are always replayed in capture order and
        their outputs live in the state's static buffers.
        """
        p = st.prompt_len
        positions: list[int | None] = (
            [p - 1 + i for i in range(1, st.max_new)] if self.per_position else [None]
        )
        try:
            stream = torch.cuda.Stream(device=self.device)
            stream.wait_stream(torch.cuda.current_stream(self.device))
            with torch.cuda.stream(stream):
                for _ in range(2):
                    for pos in positions:
                        st.step.fill_(1)
                        self._step(st, min_new, rep, pos)
            torch.cuda.current_stream(self.device).wait_stream(stream)
            if self._pool is None:
                self._pool = torch.cuda.graph_pool_handle()
            graphs = []
            for pos in positions:
                graph = torch.cuda.CUDAGraph()
                with torch.cuda.graph(graph, pool=self._pool):
                    self._step(st, min_new, rep, pos)
                graphs.append(graph)
            return graphs
        except torch.cuda.OutOfMemoryError:
            raise
        except Exception as exc:  # a driver or capture limitation: run eagerly
            log.warning("CUDA graph capture failed (%s); decoding without graphs", exc)
            self.use_graphs = False
            return None

    # ---- the model --------------------------------------------------------
    def _prefill(self, embeds: torch.Tensor, st: _State) -> torch.Tensor:
        p = embeds.shape[1]
        x = embeds.to(self.dtype)
        if self.project_in is not None:
            x = F.linear(x, self.project_in)
        x = x + self.pos_w[self.pos_offset : self.pos_offset + p]
        for li, layer in enumerate(self.layers):
            x = self._layer(layer, x, st, li, None, None)
        return self._logits(x[:, -1])

    def _step(self, st: _State, min_new: int, rep: float, at: int | None = None) -> None:
        """One token for every row. `at`: the fed token's position, if known when recorded."""
        x = self.embed_w.index_select(0, st.ids)
        if self.project_in is not None:
            x = F.linear(x, self.project_in)
        pos: torch.Tensor | int
        mask: torch.Tensor | None
        if at is None:  # position from device state: one graph serves every step
            pos = st.step + (st.prompt_len - 1)
            x = (x + self.pos_w.index_select(0, pos + self.pos_offset)).unsqueeze(1)
            mask = (st.arange <= pos).view(1, 1, 1, -1)
        else:
            pos, mask = at, None
            x = (x + self.pos_w[at + self.pos_offset]).unsqueeze(1)
        for li, layer in enumerate(self.layers):
            x = self._layer(layer, x, st, li, pos, mask)
        self._select(self._logits(x[:, 0]), st, min_new, rep)
        st.step.add_(1)

    def _layer(
        self,
        layer: _Layer,
        x: torch.Tensor,
        st: _State,
        li: int,
        pos: torch.Tensor | int | None,
        mask: torch.Tensor | None,
    ) -> torch.Tensor:
        b, s, _ = x.shape
        residual = x
        h = self._ln(x, layer.ln1) if self.pre_ln else x
        qkv = F.linear(h, layer.qkv_w, layer.qkv_b).view(b, s, 3, self.heads, self.head_dim)
        q, k, v = (t.transpose(1, 2) for t in qkv.unbind(2))
        kc, vc = st.k[li], st.v[li]
        if pos is None:  # prefill: the whole prompt at once, causal
            kc[:, :, :s].copy_(k)
            vc[:, :, :s].copy_(v)
            attn = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        elif isinstance(pos, int):  # one token against exactly the filled cache
            kc[:, :, pos : pos + 1].copy_(k)
            vc[:, :, pos : pos + 1].copy_(v)
            attn = F.scaled_dot_product_attention(q, kc[:, :, : pos + 1], vc[:, :, : pos + 1])
        else:  # one token against the whole cache, positions > pos masked out
            kc.index_copy_(2, pos, k)
            vc.index_copy_(2, pos, v)
            attn = F.scaled_dot_product_attention(q, kc, vc, attn_mask=mask)
        attn = attn.transpose(1, 2).reshape(b, s, self.hidden)
        x = residual + F.linear(attn, layer.out_w, layer.out_b)
        if not self.pre_ln:
            x = self._ln(x, layer.ln1)
        residual = x
        h = self._ln(x, layer.ln2) if self.pre_ln else x
        h = F.linear(self.act(F.linear(h, layer.fc1_w, layer.fc1_b)), layer.fc2_w, layer.fc2_b)
        x = residual + h
        if not self.pre_ln:
            x = self._ln(x, layer.ln2)
        return x

    def _ln(
        self, x: torch.Tensor, wb: tuple[torch.Tensor | None, torch.Tensor | None]
    ) -> torch.Tensor:
        return F.layer_norm(x, (self.hidden,), wb[0], wb[1], self.eps)

    def _logits(self, x: torch.Tensor) -> torch.Tensor:
        if self.final_ln is not None:
            x = self._ln(x, self.final_ln)
        if self.project_out is not None:
            x = F.linear(x, self.project_out)
        return F.linear(x, self.lm_w).float()

    def _select(self, logits: torch.Tensor, st: _State, min_new: int, rep: float) -> None:
        """HF's greedy logits processing, device-side only: penalty, min length, argmax, EOS."""
        if rep != 1.0:
            score = logits.gather(1, st.seen)
            score = torch.where(score < 0, score * rep, score / rep)
            logits.scatter_(1, st.seen, score)
        if min_new > 0 and self.eos.numel():
            too_short = (st.step < min_new).view(1, 1)
            logits = torch.where(too_short, logits + self._eos_cols, logits)
        nxt = logits.argmax(-1)
        nxt = torch.where(st.done, torch.full_like(nxt, self.pad_id), nxt)
        if self.eos.numel():
            st.done.logical_or_((nxt.unsqueeze(1) == self.eos.unsqueeze(0)).any(1))
        st.out.index_copy_(1, st.step, nxt.unsqueeze(1))
        st.seen.index_copy_(1, st.step + st.prompt_len, nxt.unsqueeze(1))
        st.ids.copy_(nxt)


def _fuse(layer: Any) -> _Layer:
    a = layer.self_attn
    qkv_w = torch.cat([a.q_proj.weight, a.k_proj.weight, a.v_proj.weight], 0)
    biases = [a.q_proj.bias, a.k_proj.bias, a.v_proj.bias]
    qkv_b = torch.cat(biases, 0) if all(bb is not None for bb in biases) else None
    return _Layer(
        ln1=(layer.self_attn_layer_norm.weight, layer.self_attn_layer_norm.bias),
        qkv_w=qkv_w,
        qkv_b=qkv_b,
        out_w=a.out_proj.weight,
        out_b=a.out_proj.bias,
        ln2=(layer.final_layer_norm.weight, layer.final_layer_norm.bias),
        fc1_w=layer.fc1.weight,
        fc1_b=layer.fc1.bias,
        fc2_w=layer.fc2.weight,
        fc2_b=layer.fc2.bias,
    )


def _activation(name: str) -> Callable[[torch.Tensor], torch.Tensor]:
    if name == "relu":
        return F.relu
    from transformers.activations import ACT2FN

    fn: Callable[[torch.Tensor], torch.Tensor] = ACT2FN[name]
    return fn
