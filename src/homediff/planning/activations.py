"""The bytes a training step of XUT keeps for its backward pass, derived from its graph.

Per sample, per token of a block (d: width, m: SwiGLU width, h: heads), autograd keeps these
tensors (``f``: 4 bytes, float32; ``c``: the compute dtype's bytes, 2 under bf16/fp16 autocast,
else 4; "cast": only under autocast):

=============== ====================================================================================
float32         the block's input (d; in the input's dtype); per modulated norm the reciprocal RMS
                (1) and the normalised stream (d); RoPE's angles (d/2) and cos/sin table (d);
                attention's log-sum-exp (h); the stream after attention (d); cast: q and k
                upcast for RoPE (2d)
compute         the norm output fed to qkv (d); qkv (3d); rotated q and k (2d); attention's output
                (d); the out projection's output (d, for the gate); the norm output fed to the MLP
                (d); w12's output (2m); silu (m); silu · gate (m); w3's output (d)
cross-attention float32: norm (1 + d), angles and table (3d/2), q upcast for RoPE (d), cast: k
                upcast (d), log-sum-exp (h), the stream after it (d); compute: the norm output (d),
                cast: the skip (d), kv (2d), rotated q and k (2d), output (d), out projection (d)
=============== ====================================================================================

Where attention takes the matmul path (``models.attention``), each attention keeps its tokens²
probabilities per head (float32, and under autocast their compute-dtype copy) instead of the
log-sum-exp, and with more than one sample a contiguous copy of its values (d, compute) instead
of (under autocast) its projection's output. Per sample a (1, d) float32 norm gain per modulated
norm; per attention its RoPE frequencies; under autocast the compute-dtype copy of every weight
matrix outside the conditioning whose layer's input needs a gradient. Outside the blocks: the conditioning
(time, aspect and pooled-text embeddings, the three shared adaLN networks, per sample, float32:
the model computes it outside autocast), the noisy latents and text states (inputs of the patch
embedding and text projection), the position maps, the routing's input and kept indices, the
unpatch input, and the loss's prediction and target. With gradient checkpointing a block keeps
only its input, and its tensors above exist while its backward runs.

``peak_bytes`` walks a step: the end of the forward pass, then the backward pass block by block,
where each block's tensors are freed as its parameters' gradients appear, plus a transient of
the gradients in flight (the incoming and outgoing stream gradients and the MLP's).
"""

from __future__ import annotations

from dataclasses import dataclass, field

from homediff.models.attention import fits
from homediff.models.tread import kept_count
from homediff.models.xut import XUTConfig

F32 = 4
INDEX = 8  # int64 routing indices


@dataclass
class Segment:
    """One block of a step, in execution order: what it keeps whole and checkpointed, and its
    weights' bytes as gradients and (under autocast) as compute-dtype copies."""

    name: str
    saved: int
    kept_input: int
    transient: int
    weights: int = 0  # parameters (numel)
    casts: int = 0  # bytes of its weights' compute-dtype copies


@dataclass
class StepShape:
    """One micro-batch: samples, latent channels × height × width, text tokens, routing rate and
    the compute dtype's bytes (2: bf16/fp16 autocast, 4: float32)."""

    batch: int
    channels: int
    height: int
    width: int
    text_tokens: int
    tread_rate: float
    compute: int = F32
    matmul_attention: bool = False  # attention by the matmul path (``models.attention``) where it may

    @property
    def autocast(self) -> bool:
        return self.compute != F32


@dataclass
class Activations:
    """The step's saved tensors: outside the blocks (``before``: up to the first block; ``after``:
    the last block's consumers) and per block."""

    before: int
    after: int
    blocks: list[Segment] = field(default_factory=list)
    unsaved_casts: int = 0  # weight copies autocast makes but autograd does not keep

    @property
    def saved(self) -> int:
        """Everything autograd keeps at the end of the forward pass without checkpointing."""
        return self.before + self.after + sum(b.saved for b in self.blocks)


def _block_per_token(c: XUTConfig, compute: int, cross: bool, input_bytes: int) -> tuple[int, int]:
    """(bytes kept per token, transient bytes per token during its backward) of one block."""
    d, m, heads = c.dim, c.mlp_dim, c.dim // c.head_dim
    cast = d if compute != F32 else 0
    floats = 4 * d + d // 2 + 2 * cast + heads + 2
    computed = 10 * d + 4 * m
    if cross:
        floats += 4 * d + d // 2 + cast + heads + 1
        computed += 7 * d + cast
    transient = F32 * 2 * d  # the stream's gradients in and out
    return F32 * floats + compute * computed + input_bytes * d, transient


def _block(c: XUTConfig, name: str, shape: StepShape, tokens: int, cross: bool, input_bytes: int,
           weights: int, matrix_weights: int) -> Segment:
    per_token, transient = _block_per_token(c, shape.compute, cross, input_bytes)
    attentions = 2 if cross else 1
    norms = 3 if cross else 2
    rope = attentions * (c.dim // c.head_dim) * (c.head_dim // 4) * 2 * F32
    casts = matrix_weights * shape.compute if shape.autocast else 0
    per_sample = tokens * per_token + norms * c.dim * F32
    heads = c.dim // c.head_dim
    if shape.matmul_attention and fits(shape.batch, heads, tokens, tokens):
        # the float32 softmax output and, under autocast, its compute-dtype copy, for each
        # attention's tokens² scores per head, where SDPA keeps a log-sum-exp per token and head
        probabilities = F32 + (shape.compute if shape.autocast else 0)
        per_sample += attentions * tokens * heads * (tokens * probabilities - F32)
        if shape.batch > 1:
            # the batched product takes a contiguous copy of the values (d); under autocast that
            # copy was the last use of the projection holding them (qkv, 3d; kv, 2d), since RoPE
            # keeps float32 copies of q and k
            per_sample += attentions * tokens * shape.compute * c.dim
            if shape.autocast:
                per_sample -= tokens * shape.compute * c.dim * (3 + (2 if cross else 0))
    return Segment(name, shape.batch * per_sample + rope + casts, shape.batch * tokens * input_bytes * c.dim,
                   shape.batch * tokens * transient, weights, casts)


def _conditioning(c: XUTConfig) -> int:
    """Per sample: the time embedding, aspect and pooled-text embeddings, and per shared adaLN
    network in use its LayerNorm's statistics, its layers' inputs (d, 4d, 4d) and the modulations
    the blocks keep (1 + scale and 1 + gate); all float32, as the model computes them outside
    autocast."""
    d, kinds = c.dim, 3 if c.skip != "none" else 2  # without cross-attention its network's graph is dropped
    values = 2 * d + d + kinds * (9 * d + 2 * d)  # time embedding (2d), their sum (d), adaLN
    if c.aspect_embedding:
        values += 1 + 2 * d
    if c.pooled_text:
        values += c.ctx_dim + 2 * d
    return F32 * values + kinds * 2 * F32


def block_weights(model) -> dict[str, tuple[int, int]]:
    """Per block of ``model`` (an XUT, e.g. on the meta device), by module name: (trained
    parameters, values of its weight matrices)."""
    from torch import nn

    from homediff.models.layers import Block

    found = {}
    for name, module in model.named_modules():
        if isinstance(module, Block):
            matrices = sum(m.weight.numel() for m in module.modules() if isinstance(m, nn.Linear))
            found[name] = (sum(p.numel() for p in module.parameters() if p.requires_grad), matrices)
    return found


def outside_casts(model) -> tuple[int, int]:
    """Weight-matrix values outside the blocks whose compute-dtype copies autograd keeps, and
    those it does not (the text projection, whose input needs no gradient). The conditioning
    networks (time, aspect and pooled-text embeddings, shared adaLN) run outside autocast: no
    copies."""
    from torch import nn

    from homediff.models.layers import Block

    inside = {id(p) for m in model.modules() if isinstance(m, Block) for p in m.parameters()}
    uncast = ("time_emb.", "addon_info_embs_proj.", "pooled_text_proj.", "shared_adaln_")  # the conditioning
    kept = unsaved = 0
    for name, module in model.named_modules():
        if (isinstance(module, (nn.Linear, nn.Conv2d)) and id(module.weight) not in inside
                and not name.startswith(uncast)):
            if name == "ctx_proj":
                unsaved += module.weight.numel()
            else:
                kept += module.weight.numel()
    return kept, unsaved


def activations(model, shape: StepShape) -> Activations:
    """The tensors a training step of ``model`` (an XUT) keeps, by part (see the module's docstring)."""
    c: XUTConfig = model.config
    b, d, compute = shape.batch, c.dim, shape.compute
    n_image = (shape.height // c.patch_size) * (shape.width // c.patch_size)
    full = n_image + shape.text_tokens
    routed = shape.tread_rate > 0
    core = (kept_count(n_image, shape.tread_rate) if routed else n_image) + shape.text_tokens
    weights = block_weights(model)
    kept_casts, unsaved_casts = outside_casts(model)

    latent = shape.channels * shape.height * shape.width
    # the conditioning, the inputs of the patch embedding and text projection (noisy latents, text
    # states), the position map of the whole sequence, and weight copies outside the blocks
    before = b * (_conditioning(c) + compute * (latent + shape.text_tokens * c.ctx_dim)
                  + full * 2 * F32) + (kept_casts * compute if shape.autocast else 0)
    if routed:  # the sequence entering the routing, the kept tokens' positions and indices
        entering = F32 if c.tread_pre_blocks else compute
        before += b * (full * d * entering + core * 2 * F32 + (core - shape.text_tokens) * INDEX)
    blocks: list[Segment] = []
    seq_bytes = compute  # the first block's input: the patch and text projections' output
    for name, (params, matrices) in weights.items():
        tokens = core if name.startswith("backbone.") else full
        cross = name.endswith(".0") and ".dec_blocks." in name and c.skip != "none"
        blocks.append(_block(c, name, shape, tokens, cross, seq_bytes, params, matrices))
        seq_bytes = F32  # a block's output is float32 (its residual adds float32 norm outputs)
    last_view = b == 1 and not shape.autocast  # one sample: the unpatch input is a view of the last output
    after = b * (compute * n_image * d if not last_view else F32 * full * d)
    after += b * 2 * F32 * latent  # the loss's prediction (as float32) and target
    return Activations(before, after, blocks, unsaved_casts * compute if shape.autocast else 0)


def peak_bytes(model, shape: StepShape, checkpointing: bool, gradients_held: bool) -> int:
    """The most memory a training step's activations and gradients take at once, beyond the
    weights: the end of the forward pass, or a block's backward (its tensors, recomputed under
    checkpointing, its gradients in flight, the earlier blocks' tensors and the gradients so far).
    ``gradients_held``: every gradient exists from the start (a later micro-batch of an
    accumulated step)."""
    acts = activations(model, shape)
    total = F32 * sum(p.numel() for p in model.parameters() if p.requires_grad)

    def kept(segment: Segment) -> int:
        return segment.kept_input if checkpointing else segment.saved

    stored = acts.before + sum(kept(s) for s in acts.blocks)
    grads = total if gradients_held else F32 * sum(
        p.numel() for p in model.out_patch.parameters() if p.requires_grad)  # the first computed
    cached = sum(s.casts for s in acts.blocks) if checkpointing else 0  # autocast's cache, until it exits
    peak = stored + acts.after + acts.unsaved_casts + cached + (total if gradients_held else 0)
    for segment in reversed(acts.blocks):  # its gradients appear as its tensors are freed
        stored -= kept(segment)
        peak = max(peak, stored + segment.saved + segment.transient + grads)
        if not gradients_held:
            grads += F32 * segment.weights
    return max(peak, acts.before + total)
