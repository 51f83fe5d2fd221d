"""Compressed per-example (and per-token) gradients of a causal LM through Linear-layer hooks.

For each selected Linear ``z = W x (+ b)`` the forward hook keeps only the compressor's input
features of x (FactGraSS: the k_in masked columns; LoGra: P_in x) — never the full activation —
and registers a tensor hook on z. When autograd produces ``delta = dloss/dz`` the hook reduces it
to the layer's compressed per-example vector at once and frees the features. On the CPU, a
FactGraSS layer's per-example hooks are C++ (``capture.native``: no Python per layer and step),
and the Python hooks' plain contiguous tensors go straight to the extension
(``FactGraSS.host_calls``), which checks the call in C++; anything else takes the checked path.

No weight gradient is ever computed: every parameter is frozen for the duration of the capture,
so backward flows only through activations (DESIGN.md, measured facts). A hooked layer whose
output does not require grad (nothing upstream does: it is among the first hooked layers) makes
that output a leaf that requires grad, so backward stops there: nothing below the first hooked
layers (their input gradients, the norms and embedding before them, the blocks before a hooked
subset) is recorded or run. With gradient checkpointing the input embedding's output is the
leaf instead, since a checkpointed block needs inputs that require grad. Shapes: B batch, T
tokens, K compressed size.

Vector compressors (GraSS, SJLT, Gaussian, FJLT, identity) take the slow path: the hook keeps x
and materializes each example's exact ``G = sum_t delta_t x_t^T`` before compressing it.
"""

from __future__ import annotations

import warnings
from collections.abc import Sequence

import torch
from torch import nn

from grass_llm.capture.batch import CaptureOutput, check_batch, right_align, row_example
from grass_llm.capture.layers import select_layers
from grass_llm.capture.native import NativeHooks, two_gradients
from grass_llm.capture.setup import (checkpointed, deterministic_mode, embedding_leaf, grad_leaf,
                                     local, shard_view)
from grass_llm.capture.tokens import TokenRows
from grass_llm.capture.loss import (
    REDUCTIONS,
    expand_per_token,
    per_example_loss,
    position_ids_from_mask,
)
from grass_llm.compress import FactorizedCompressor, build_compressor, derive_seed
from grass_llm.compress.base import compute_dtype
from grass_llm.parallel import comm

TOKEN_MODES = (None, "loss", "position")


class GradientCapture:
    """Context manager that turns a causal LM into a compressed-gradient extractor.

    Example::

        with GradientCapture(model, "factgrass:k=4096,k_in=128,k_out=128", seed=0) as cap:
            out = cap(input_ids, attention_mask, labels)  # out.grads: {layer: [B, 4096]}

    Args:
        model: a Hugging Face causal LM (anything returning ``.logits`` from ``input_ids``).
        spec: compressor spec string (see ``grass_llm.compress``), the same for every layer.
        layers: include patterns (``None``: every Linear in the decoder blocks).
        exclude: exclude patterns.
        seed: global seed; layer ``name`` uses ``derive_seed(seed, name)``.
        reduction: ``"sum"`` (default) or ``"mean"`` of target-token NLL per example.
        token_mode: ``None`` (per example), ``"loss"`` (one row per target token: the exact
            gradient of that token's loss alone; costs one row of compute per target token) or
            ``"position"`` (one row per non-pad input position t: the term ``delta_t x_t^T`` of
            the example's gradient, from a single backward pass).
        include_bias: give layers that have a bias a bias column in their compressed gradient.
        token_batch_size: rows per forward/backward in ``loss`` mode (default: the batch size).
        token_dtype: ``position`` mode: the dtype its rows are kept in (e.g. the store's), each
            layer's rows rounded to it as they arrive; None keeps the compute dtype.
        tp_group: the tensor-parallel process group when the model's Linear layers were
            parallelized with DTensor (``grass_llm.parallel.apply_tp``): each rank then
            compresses its local shard on global indices and the partial vectors are summed
            over the group, so every rank returns the unsharded result.
        keep_trainable: parameters to leave trainable (DeepSpeed ZeRO-3's unused anchor, see
            ``grass_llm.parallel.zero3``); every other parameter is frozen during capture.
    """

    #: FactGraSS layers on the CPU run their per-example hooks in C++ (``capture.native``);
    #: False keeps every layer on the Python hooks (``tools/capture_profile.py`` times them).
    native_hooks = True

    def __init__(self, model: nn.Module, spec: str, *, layers: Sequence[str] | None = None,
                 exclude: Sequence[str] | None = None, seed: int = 0, reduction: str = "sum",
                 token_mode: str | None = None, include_bias: bool = True,
                 token_batch_size: int | None = None, tp_group=None,
                 keep_trainable: Sequence[nn.Parameter] = (),
                 token_dtype: torch.dtype | None = None):
        if reduction not in REDUCTIONS:
            raise ValueError(f"reduction must be one of {REDUCTIONS}, got {reduction!r}")
        if token_mode not in TOKEN_MODES:
            raise ValueError(f"token_mode must be one of {TOKEN_MODES}, got {token_mode!r}")
        if token_mode == "loss" and reduction != "sum":
            raise ValueError("token_mode='loss' needs reduction='sum' (per-token losses add up "
                             "to the example's loss only for a sum)")
        self.model, self.spec, self.seed = model, spec, seed
        self.reduction, self.token_mode = reduction, token_mode
        self.token_batch_size = token_batch_size
        if token_dtype is not None and not token_dtype.is_floating_point:
            raise ValueError(f"token_dtype must be a floating-point dtype, got {token_dtype}")
        self.token_dtype = token_dtype
        self._sink: TokenRows | None = None
        self.layers = select_layers(model, layers, exclude)
        self.compressors = {}
        self._bias: dict[str, bool] = {}
        for name, mod in self.layers.items():
            bias = include_bias and mod.bias is not None
            self._bias[name] = bias
            try:
                self.compressors[name] = build_compressor(
                    spec, seed=derive_seed(seed, name), d_in=mod.in_features,
                    d_out=mod.out_features, bias=bias, layer=name,
                    p=mod.out_features * (mod.in_features + bias))
            except ValueError as err:
                if "mask file" in str(err):  # a file problem, not a size problem
                    raise ValueError(f"layer {name}: {err}") from err
                raise ValueError(f"compressor {spec!r} does not fit layer {name} "
                                 f"({mod.out_features} x {mod.in_features}): {err}; choose "
                                 "smaller sizes or leave the layer out (exclude)") from err
        # What the hooks apply per layer: the compressor, or its tensor-parallel shard view.
        self.tp_group = tp_group
        self._keep = {id(p) for p in keep_trainable}
        self._ops = {name: shard_view(comp, self.layers[name], tp_group)
                     for name, comp in self.compressors.items()}
        self._handles: list = []
        self._native = NativeHooks()
        self._reduce: dict = {}  # per layer: the checked reduction (feats, delta) -> rows
        self._feats: dict[str, torch.Tensor] = {}
        self._results: dict[str, torch.Tensor] = {}
        self._saved_state: tuple | None = None
        self._dropout_saved: list = []

    # ----------------------------------------------------------------------------- set-up
    def describe(self) -> list[tuple[str, str, int]]:
        """``(layer, shape "d_out x d_in(+1)", compressed size)`` for every hooked layer."""
        rows = []
        for name, comp in self.compressors.items():
            mod = self.layers[name]
            bias = "+1" if self._bias[name] else ""
            rows.append((name, f"{mod.out_features} x {mod.in_features}{bias}", comp.k))
        return rows

    @property
    def total_k(self) -> int:
        """Numbers stored per example over all hooked layers."""
        return sum(c.k for c in self.compressors.values())

    def __enter__(self) -> GradientCapture:
        if self._handles:
            raise RuntimeError("this GradientCapture is already active")
        m = self.model
        self._saved_state = ([(p, p.requires_grad) for p in m.parameters()], m.training,
                             getattr(getattr(m, "config", None), "use_cache", None))
        for p in m.parameters():
            p.requires_grad_(id(p) in self._keep)
        self._dropout_saved = deterministic_mode(m)
        if self._saved_state[2] is not None:
            m.config.use_cache = False
        if checkpointed(m):  # a checkpointed block needs inputs that require grad
            emb = m.get_input_embeddings()
            self._handles.append(emb.register_forward_hook(embedding_leaf))
        for name, mod in self.layers.items():
            self._handles.append(mod.register_forward_hook(self._forward_hook(name)))
        return self

    def __exit__(self, *exc) -> None:
        for h in self._handles:
            h.remove()
        self._handles.clear()
        self._native.clear()
        self._feats.clear()
        self._results.clear()
        params, training, use_cache = self._saved_state
        for p, req in params:
            p.requires_grad_(req)
        self.model.train(training)
        for mod, value in self._dropout_saved:
            mod.attention_dropout = value
        if use_cache is not None:
            self.model.config.use_cache = use_cache

    # ------------------------------------------------------------------------------ hooks
    def _forward_hook(self, name: str):
        comp = self.compressors[name]
        op = self._ops[name]
        bias = self._bias[name]
        reduce_in = getattr(op, "reduce_input", False)
        # The CPU extension's calls bound once (FactGraSS.host_calls): a plain contiguous CPU
        # activation skips every Python-level step below; anything else takes them. A layer
        # that does not live on the CPU (a GPU run) gets neither these nor the C++ hooks.
        on_cpu = self.layers[name].weight.device.type == "cpu"
        gather, host_reduce = (op.host_calls() if on_cpu and hasattr(op, "host_calls")
                               else None) or (None, None)
        on_grad = self._grad_hook(name, host_reduce)
        feats = self._feats

        def features(x):
            x = local(x).detach()
            x = x if x.dim() == 3 else x.unsqueeze(1)
            if isinstance(comp, FactorizedCompressor):
                xf = op.input_features(x)
                if reduce_in:  # LoGra on a rowwise shard: P_in x is a sum over the group
                    comm.all_reduce(xf, group=self.tp_group)
                return xf
            x = x.to(compute_dtype(x))
            if bias:
                x = torch.cat([x, x.new_ones(*x.shape[:-1], 1)], dim=-1)
            return x

        def hook(module, args, output):
            if not torch.is_grad_enabled():
                return None  # e.g. the no-grad first pass of reentrant checkpointing
            leaf = grad_leaf(output)  # among the first hooked layers: backward stops here
            output = output if leaf is None else leaf
            x = args[0]
            # Kept until delta arrives: the k_in features for factorized maps, x itself for
            # the materializing slow path. A recomputation (gradient checkpointing) overwrites
            # it with identical values. (type() is exact: DTensor and the tracing subclasses
            # of torch.compile take the general path.)
            if (gather is not None and type(x) is torch.Tensor and x.is_cpu and x.dim() == 3
                    and x.is_contiguous()):
                try:
                    feats[name] = gather(x)
                except RuntimeError:  # the general path says precisely what is wrong
                    feats[name] = features(x)
            else:
                feats[name] = features(x)
            output.register_hook(on_grad)
            return leaf  # None keeps the module's output; a leaf replaces it

        if on_cpu and self.native_hooks and self.token_mode != "position":
            return self._native.forward_hook(name, op, hook)
        return hook

    def _grad_hook(self, name: str, host_reduce=None):
        comp = self.compressors[name]
        op = self._ops[name]
        reduce_out = getattr(op, "reduce_output", False)
        per_position = self.token_mode == "position"
        pop = self._feats.pop

        def reduce(feats, grad):
            d = local(grad).detach()
            d = d if d.dim() == 3 else d.unsqueeze(1)
            if isinstance(comp, FactorizedCompressor) and reduce_out:
                # LoGra on a colwise shard: P_out delta is a sum over the group
                df = op.output_features(d)
                comm.all_reduce(df, group=self.tp_group)
                return (op.combine_per_token(feats, df) if per_position
                        else op.combine(feats, df))
            if isinstance(comp, FactorizedCompressor):
                return op.reduce(feats, d, per_position)  # fused kernel where there is one
            return _materialized(comp, feats, d.to(compute_dtype(d)), per_position)

        self._reduce[name] = reduce

        def hook(grad):
            feats = pop(name, None)
            if feats is None:
                raise RuntimeError(f"layer {name}: output gradient without stored inputs (is "
                                   "the layer called twice in one forward?)")
            res = None
            if (host_reduce is not None and type(grad) is torch.Tensor and grad.dim() == 3
                    and grad.is_contiguous()):
                try:  # the extension checks the call itself (kernels.host_calls)
                    res = host_reduce(feats, grad, per_position)
                except RuntimeError:
                    res = None  # the general path says precisely what is wrong
            if res is None:
                res = reduce(feats, grad)
            if name in self._results:
                raise RuntimeError(two_gradients(name))
            if self._sink is not None:  # position mode: rows written out now, block freed
                self._sink.put(name, res)
                res = None
            self._results[name] = res
            return None

        return hook

    # ---------------------------------------------------------------------------- compute
    def __call__(self, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None,
                 labels: torch.Tensor | None = None) -> CaptureOutput:
        """Compressed gradients for one batch.

        Args:
            input_ids: ``[B, T]`` token ids (left or right padded).
            attention_mask: ``[B, T]`` 1 for real tokens (default: all ones).
            labels: ``[B, T]`` target ids, ``-100`` where not a target (default: ``input_ids``
                with padding ignored).
        """
        if not self._handles:
            raise RuntimeError("use GradientCapture as a context manager: `with ... as cap:`")
        input_ids, attention_mask, labels = check_batch(input_ids, attention_mask, labels)
        # Left padding is moved to the right: results are identical (positions come from the
        # mask), and no query row is left with every key masked, which makes some attention
        # kernels (transformers' eager softmax on float64) produce NaN that backward spreads.
        input_ids, attention_mask, labels, start = right_align(input_ids, attention_mask,
                                                                labels)
        if self.token_mode == "loss":
            out = self._per_token_loss(input_ids, attention_mask, labels)
            out.positions = out.positions + start[row_example(out.offsets)]
            return out
        if self.token_mode == "position":
            return self._per_position(input_ids, attention_mask, labels, start)
        grads, loss, n = self._step(input_ids, attention_mask, labels)
        return CaptureOutput(grads, loss, n)

    def _per_position(self, input_ids, attention_mask, labels, start) -> CaptureOutput:
        real = attention_mask.bool()
        partial = frozenset(k for k in self.layers if getattr(self._ops[k], "partial", False))
        sink = TokenRows(real, {k: c.k for k, c in self.compressors.items()}, self.token_dtype,
                         partial, self.tp_group)
        self._sink = sink
        try:
            _, loss, n = self._step(input_ids, attention_mask, labels)
        finally:
            self._sink = None
        sink.finish()
        counts = real.sum(1)
        offsets = torch.cat([counts.new_zeros(1), counts.cumsum(0)])
        positions = real.nonzero(as_tuple=True)[1] + start[row_example(offsets)]
        return CaptureOutput(sink.views(), loss, n, offsets, positions, sink.rows, sink.example)

    def _step(self, input_ids, attention_mask, labels):
        self._feats.clear()
        self._results.clear()
        self._native.reset()
        with torch.enable_grad():
            out = self.model(input_ids=input_ids, attention_mask=attention_mask,
                             position_ids=position_ids_from_mask(attention_mask),
                             use_cache=False)
            loss, n = per_example_loss(out.logits, labels, self.reduction)
            del out
            if bool((n == 0).any()):
                warnings.warn(f"{int((n == 0).sum())} example(s) have no target token; their "
                              "gradients are zero", stacklevel=3)
            if loss.requires_grad:  # else no hooked layer is on the loss's path: error below
                loss.sum().backward()
        self._native.collect(self._results, self._reduce)
        missing = [k for k in self.layers if k not in self._results]
        if missing:
            raise RuntimeError(f"no output gradient reached {len(missing)} hooked layer(s), "
                               f"e.g. {missing[:3]}; they do not influence the loss")
        grads, self._results = self._results, {}
        self._feats.clear()
        if self._sink is None:  # streamed rows are reduced by the sink
            self._sum_partials(grads)
        return grads, loss.detach(), n

    def _sum_partials(self, grads: dict[str, torch.Tensor]) -> None:
        """Tensor parallel: add up the ranks' partial vectors, in one collective per step."""
        partial = [k for k in grads if getattr(self._ops[k], "partial", False)]
        if not partial:
            return
        flat = torch.cat([grads[k].reshape(-1) for k in partial])
        comm.all_reduce(flat, group=self.tp_group)
        for k, piece in zip(partial, flat.split([grads[k].numel() for k in partial])):
            grads[k] = piece.view_as(grads[k])

    def _per_token_loss(self, input_ids, attention_mask, labels) -> CaptureOutput:
        exp = expand_per_token(input_ids, attention_mask, labels)
        rows = self.token_batch_size or input_ids.shape[0]
        chunks: dict[str, list[torch.Tensor]] = {k: [] for k in self.layers}
        losses = []
        for r0 in range(0, exp.labels.shape[0], rows):
            sl = slice(r0, r0 + rows)
            grads, loss, _ = self._step(exp.input_ids[sl], exp.attention_mask[sl],
                                        exp.labels[sl])
            for k, v in grads.items():
                chunks[k].append(v)
            losses.append(loss)
        dev = input_ids.device
        grads = {k: (torch.cat(v) if v else torch.zeros(0, self.compressors[k].k, device=dev))
                 for k, v in chunks.items()}
        tok_loss = torch.cat(losses) if losses else torch.zeros(0, device=dev)
        loss = torch.zeros(input_ids.shape[0], dtype=tok_loss.dtype, device=input_ids.device)
        loss.index_add_(0, exp.example.to(loss.device), tok_loss.to(loss.device))
        n = exp.offsets[1:] - exp.offsets[:-1]
        return CaptureOutput(grads, loss, n, exp.offsets, exp.position)


def _materialized(comp, x_BTI, d_BTO, per_position: bool) -> torch.Tensor:
    """Slow path: form each example's (or position's) exact gradient, then compress it."""
    if per_position:
        B, T = x_BTI.shape[:2]
        g = torch.einsum("bto,bti->btoi", d_BTO, x_BTI).reshape(B * T, -1)
        return comp.apply_unchecked(g).reshape(B, T, comp.k)
    g = torch.einsum("bto,bti->boi", d_BTO, x_BTI).reshape(x_BTI.shape[0], -1)
    return comp.apply_unchecked(g)
