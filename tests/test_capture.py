"""Gradient capture against per-example for-loops of ordinary backward() calls."""

import pytest
import torch
import torch.nn.functional as F

from grass_llm.capture import GradientCapture, select_layers
from grass_llm.capture.loss import IGNORE
from grass_llm.models import FAMILIES, tiny_model

# Inputs in float64: capture and reference differ only by summation order (batched vs single
# example, bmm vs W.grad GEMM), so 1e-9 relative is far above round-off and far below a bug.
TOL64 = dict(rtol=1e-9, atol=1e-11)


# transformers' RMSNorm computes in float32 even inside a float64 model, so backward rounds each
# gradient passing through a norm to float32 (relative 6e-8): per-token rows are rounded one by
# one, their per-example sum only once. Sums of token rows therefore match the per-example row to
# ~5e-8 (measured), not to float64 round-off; 1e-6 leaves margin, a real bug is of order 1.
TOKEN_SUM_REL = 1e-6


def assert_rows_close(a, b, rel=TOKEN_SUM_REL):
    """Row-wise ||a - b|| <= rel ||b||: round-off is relative to a row's scale (sums of token
    rows cancel, so single elements can be tiny)."""
    err = (a - b).norm(dim=-1)
    scale = b.norm(dim=-1).clamp_min(1e-30)
    assert bool((err <= rel * scale).all()), (err / scale).max()


SPECS = ["factgrass:k=16,k_in=6,k_out=5", "factgrass:k=24,k_in=8,k_out=7,c=2",
         "logra:k_in=3,k_out=4", "grass:k=20,k_prime=50", "identity"]
LENGTHS = [7, 3, 9, 5, 1 + 1]  # mixed lengths, batch of 5


def make_examples(vocab=101, lengths=LENGTHS, seed=1):
    gen = torch.Generator().manual_seed(seed)
    examples = []
    for i, n in enumerate(lengths):
        ids = torch.randint(0, vocab, (n,), generator=gen)
        labels = ids.clone()
        if i == 2:
            labels[:4] = IGNORE  # a prompt/completion pair: the prompt is not a target
        examples.append((ids, labels))
    return examples


def pad_batch(examples, side="right", pad_id=0):
    T = max(len(ids) for ids, _ in examples)
    B = len(examples)
    ids_bt = torch.full((B, T), pad_id)
    lab_bt = torch.full((B, T), IGNORE)
    mask_bt = torch.zeros(B, T, dtype=torch.long)
    for b, (ids, lab) in enumerate(examples):
        sl = slice(0, len(ids)) if side == "right" else slice(T - len(ids), T)
        ids_bt[b, sl], lab_bt[b, sl], mask_bt[b, sl] = ids, lab, 1
    return ids_bt, mask_bt, lab_bt


def reference_vec_grads(model, ids, labels, layer_names, include_bias=True, token=None):
    """Per-layer row-major vec([W.grad | b.grad]) of one unpadded example's summed NLL, from a
    plain backward(); ``token``: the loss of that label position alone."""
    model.zero_grad(set_to_none=True)
    for p in model.parameters():
        p.requires_grad_(True)
    logits = model(input_ids=ids[None]).logits[0]
    targets = labels[1:].clone()
    if token is not None:
        keep = torch.full_like(targets, IGNORE)
        keep[token - 1] = targets[token - 1]
        targets = keep
    loss = F.cross_entropy(logits[:-1], targets, ignore_index=IGNORE, reduction="sum")
    loss.backward()
    mods = dict(model.named_modules())
    out = {}
    for name in layer_names:
        mod = mods[name]
        g = mod.weight.grad
        if include_bias and mod.bias is not None:
            g = torch.cat([g, mod.bias.grad[:, None]], dim=1)
        out[name] = g.reshape(-1).clone()
    model.zero_grad(set_to_none=True)
    for p in model.parameters():
        p.requires_grad_(False)
    return out, float(loss.detach())


# every family with the factorized maps and a vector map; exact gradients (identity) on Llama
CASES = [(f, s) for f in FAMILIES for s in SPECS if s != "identity"] + [("llama", "identity")]


@pytest.mark.parametrize("family,spec", CASES)
def test_equals_dense_map_of_per_example_backward(family, spec):
    model = tiny_model(family, dtype=torch.float64)
    examples = make_examples()
    ids, mask, labels = pad_batch(examples, side="right")
    with GradientCapture(model, spec, seed=3) as cap:
        out = cap(ids, mask, labels)
        comps = cap.compressors
    for b, (ex_ids, ex_labels) in enumerate(examples):
        ref, ref_loss = reference_vec_grads(model, ex_ids, ex_labels, comps)
        assert abs(float(out.loss[b]) - ref_loss) < 1e-9 * max(1.0, abs(ref_loss))
        assert int(out.n_targets[b]) == int((ex_labels[1:] != IGNORE).sum())
        for name, comp in comps.items():
            expected = comp.dense_matrix() @ ref[name]
            torch.testing.assert_close(out.grads[name][b], expected, **TOL64)


@pytest.mark.parametrize("spec", ["factgrass:k=16,k_in=6,k_out=5", "logra:k_in=3,k_out=4"])
def test_backward_stops_at_the_first_hooked_layers_and_stays_exact(spec):
    # Only block 1's MLP is hooked (factgrass: the C++ hooks; logra: the Python ones). Its
    # gate/up outputs become the leaves, so nothing before them is recorded for backward, and
    # the rows still equal the dense map of a full, ordinary backward.
    model = tiny_model("llama", dtype=torch.float64)
    examples = make_examples()
    ids, mask, labels = pad_batch(examples, side="right")
    seen = {}

    def record(key):
        def hook(module, args, output):
            out = output[0] if isinstance(output, tuple) else output
            seen[key] = out.requires_grad
        return hook

    handles = [model.model.embed_tokens.register_forward_hook(record("embedding")),
               model.model.layers[0].register_forward_hook(record("block 0")),
               model.model.layers[1].post_attention_layernorm.register_forward_hook(
                   record("block 1's MLP input"))]
    with GradientCapture(model, spec, seed=3, layers=[r"re:layers\.1\.mlp\."]) as cap:
        out = cap(ids, mask, labels)
        comps = cap.compressors
    for h in handles:
        h.remove()
    assert seen == {"embedding": False, "block 0": False, "block 1's MLP input": False}
    assert sorted(comps) == [f"model.layers.1.mlp.{p}_proj" for p in ("down", "gate", "up")]
    for b, (ex_ids, ex_labels) in enumerate(examples):
        ref, _ = reference_vec_grads(model, ex_ids, ex_labels, comps)
        for name, comp in comps.items():
            torch.testing.assert_close(out.grads[name][b], comp.dense_matrix() @ ref[name],
                                       **TOL64)


@pytest.mark.parametrize("attn", ["eager", "sdpa"])
def test_batch_and_padding_invariance(attn):
    model = tiny_model("llama", dtype=torch.float64, attn_implementation=attn)
    examples = make_examples()
    spec = "factgrass:k=16,k_in=6,k_out=5"
    with GradientCapture(model, spec, seed=0) as cap:
        right = cap(*pad_batch(examples, "right"))
        left = cap(*pad_batch(examples, "left"))
        alone = [cap(*pad_batch([ex])) for ex in examples]
    # transformers' eager attention takes its softmax in float32 even for a float64 model, so
    # sequences of different padded lengths agree only to float32 round-off (~1e-7 relative);
    # sdpa stays in float64.
    tol = TOL64 if attn == "sdpa" else dict(rtol=1e-5, atol=1e-7)
    for name in right.grads:
        torch.testing.assert_close(left.grads[name], right.grads[name], **tol)
        single = torch.cat([a.grads[name] for a in alone])
        torch.testing.assert_close(single, right.grads[name], **tol)
    torch.testing.assert_close(left.loss, right.loss, **tol)


@pytest.mark.parametrize("spec", ["factgrass:k=16,k_in=6,k_out=5", "logra:k_in=3,k_out=4",
                                  "grass:k=20,k_prime=50"])
def test_token_level_loss_mode_is_exact_and_sums(spec):
    model = tiny_model("qwen2", dtype=torch.float64)  # biases included
    examples = make_examples(lengths=[6, 4, 8])
    batch = pad_batch(examples, "left")
    with GradientCapture(model, spec, seed=1) as cap:
        per_ex = cap(*batch)
    with GradientCapture(model, spec, seed=1, token_mode="loss", token_batch_size=4) as cap:
        tok = cap(*batch)
        comps = cap.compressors
    n = [int((lab[1:] != IGNORE).sum()) for _, lab in examples]
    assert tok.offsets.tolist() == [0, n[0], n[0] + n[1], sum(n)]
    torch.testing.assert_close(tok.loss, per_ex.loss, **TOL64)
    for name, rows in tok.grads.items():
        assert rows.shape == (sum(n), comps[name].k)
        sums = torch.stack([rows[a:b].sum(0) for a, b in zip(tok.offsets[:-1], tok.offsets[1:])])
        assert_rows_close(sums, per_ex.grads[name])
    # One row against the reference: example 2's third target, whose label position is known.
    ex_ids, ex_labels = examples[2]
    row = int(tok.offsets[2]) + 2
    pad = batch[0].shape[1] - len(ex_ids)
    position = int(tok.positions[row]) - pad  # left padding shifts positions
    ref, _ = reference_vec_grads(model, ex_ids, ex_labels, comps, token=position)
    for name, comp in comps.items():
        assert_rows_close(tok.grads[name][row], comp.dense_matrix() @ ref[name])


def test_token_level_position_mode_sums_to_example():
    model = tiny_model("llama", dtype=torch.float64)
    examples = make_examples()
    batch = pad_batch(examples, "right")
    spec = "factgrass:k=16,k_in=6,k_out=5"
    with GradientCapture(model, spec, seed=0) as cap:
        per_ex = cap(*batch)
    with GradientCapture(model, spec, seed=0, token_mode="position") as cap:
        pos = cap(*batch)
    assert pos.offsets[-1] == sum(LENGTHS)
    for name, rows in pos.grads.items():
        sums = torch.stack([rows[a:b].sum(0) for a, b in zip(pos.offsets[:-1], pos.offsets[1:])])
        assert_rows_close(sums, per_ex.grads[name])


def test_position_mode_streams_rows_with_one_layer_block_alive_at_a_time(monkeypatch):
    import weakref

    from grass_llm.capture import tokens

    model = tiny_model("llama", dtype=torch.float64)
    batch = pad_batch(make_examples(), "right")
    spec = "factgrass:k=16,k_in=6,k_out=5"
    with GradientCapture(model, spec, seed=0) as cap:
        per_ex = cap(*batch)
    blocks, alive = [], []
    put = tokens.TokenRows.put

    def watched(self, name, block):
        alive.append(sum(r() is not None for r in blocks))  # earlier layers' blocks
        blocks.append(weakref.ref(block))
        put(self, name, block)

    monkeypatch.setattr(tokens.TokenRows, "put", watched)
    with GradientCapture(model, spec, seed=0, token_mode="position") as cap:
        pos = cap(*batch)
    monkeypatch.undo()
    assert len(alive) == len(cap.layers) and max(alive) == 0
    width = sum(c.k for c in cap.compressors.values())
    assert pos.token_rows.shape == (sum(LENGTHS), width)
    assert pos.token_rows.dtype == torch.float64 and pos.example_rows.dtype == torch.float64
    for name, rows in pos.grads.items():
        assert rows.data_ptr() >= pos.token_rows.data_ptr()  # a view into the one buffer
        a = sum(c.k for c in list(cap.compressors.values())[:list(cap.layers).index(name)])
        assert_rows_close(pos.example_rows[:, a:a + rows.shape[1]], per_ex.grads[name])
    with GradientCapture(model, spec, seed=0, token_mode="position",
                         token_dtype=torch.float16) as cap:
        half = cap(*batch)
    assert half.token_rows.dtype == torch.float16  # rounded once, from the same values
    torch.testing.assert_close(half.token_rows, pos.token_rows.to(torch.float16), rtol=0, atol=0)
    torch.testing.assert_close(half.example_rows, pos.example_rows, rtol=0, atol=0)


def test_position_rows_sum_only_the_partial_layers_over_the_group(monkeypatch):
    # Tensor parallel with some layers sharded (partial rows, summed over the group) and some
    # not (complete on every rank): only the partial layers' columns may be reduced. The group
    # is simulated as two ranks holding the same rows, so a reduction doubles them.
    from grass_llm.capture import tokens

    monkeypatch.setattr(tokens.comm, "all_reduce", lambda t, group=None: t.mul_(2))
    real = torch.tensor([[True, True, False], [True, False, False]])
    widths = {"a": 2, "b": 3, "c": 1}
    blocks = {n: torch.randn(2, 3, k, dtype=torch.float64) for n, k in widths.items()}
    for partial in (frozenset({"a", "c"}), frozenset(widths)):
        sink = tokens.TokenRows(real, widths, torch.float32, partial)
        for n, blk in blocks.items():
            sink.put(n, blk)
        sink.finish()
        assert sink.rows.dtype == torch.float32 and sink.example.dtype == torch.float64
        for n, view in sink.views().items():
            want = blocks[n][real] * (2 if n in partial else 1)
            torch.testing.assert_close(view, want.float(), rtol=0, atol=0)
            ex = torch.stack([blocks[n][0, :2].sum(0), blocks[n][1, :1].sum(0)])
            a, b = sink.columns[n]
            torch.testing.assert_close(sink.example[:, a:b], ex * (2 if n in partial else 1))


class PythonHooks(GradientCapture):
    native_hooks = False  # every layer on the Python hooks, not the C++ ones


def test_cpu_hooks_call_the_extension_directly_and_other_inputs_take_the_checked_path(
        monkeypatch):
    """The Python hooks' lean CPU path (FactGraSS.host_calls, used where the C++ hooks are not:
    position mode, ``native_hooks = False``) serves plain contiguous activations; a
    non-contiguous input, and a call the extension refuses, take the checked path. Every row
    equals the dense map of the per-example backward either way."""
    from grass_llm import kernels
    from grass_llm.compress import factorized

    if kernels.extension() is None:
        pytest.skip("the CPU extension is not built here")
    used = {"gather": 0, "reduce": 0, "refused": 0}
    host_calls = kernels.host_calls

    def counting_host_calls(idx_in, call):
        gather, reduce = host_calls(idx_in, call)

        def counted_gather(x):
            used["gather"] += 1
            return gather(x)

        def counted_reduce(xf, d, per_token):
            used["reduce"] += 1
            if used["reduce"] == 1:  # the first call is refused as the extension would
                used["refused"] += 1
                raise RuntimeError("refused")
            return reduce(xf, d, per_token)

        return counted_gather, counted_reduce

    monkeypatch.setattr(factorized.kernels, "host_calls", counting_host_calls)
    model = tiny_model("llama", dtype=torch.float64)
    # one layer's input arrives as a transposed (non-contiguous) view of the same values
    model.model.layers[0].mlp.down_proj.register_forward_pre_hook(
        lambda mod, args: (args[0].transpose(0, 1).contiguous().transpose(0, 1),))
    examples = make_examples(lengths=[6, 4, 5])
    ids, mask, labels = pad_batch(examples)
    with PythonHooks(model, "factgrass:k=16,k_in=6,k_out=5", seed=3) as cap:
        out = cap(ids, mask, labels)
        comps = cap.compressors
    n = len(comps)
    assert used == {"gather": n - 1, "reduce": n, "refused": 1}
    for b, (ex_ids, ex_labels) in enumerate(examples):
        ref, _ = reference_vec_grads(model, ex_ids, ex_labels, comps)
        for name, comp in comps.items():
            torch.testing.assert_close(out.grads[name][b], comp.dense_matrix() @ ref[name],
                                       **TOL64)


def test_no_weight_gradients_outputs_unchanged_and_hooks_removed():
    model = tiny_model("llama")
    model.model.layers[0].mlp.up_proj.weight.requires_grad_(False)  # a user's own frozen param
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    model.train()
    ids = torch.randint(0, 101, (2, 7))
    with torch.no_grad():
        before = model.eval()(input_ids=ids).logits
    model.train()
    n_hooks = sum(len(m._forward_hooks) for m in model.modules())
    for spec in ("factgrass:k=16,k_in=6,k_out=5", "logra:k_in=3,k_out=4"):
        with GradientCapture(model, spec) as cap:
            cap(ids)
            with torch.no_grad():
                during = model(input_ids=ids).logits
        assert all(p.grad is None for p in model.parameters())
        torch.testing.assert_close(during, before, rtol=0, atol=0)
        assert sum(len(m._forward_hooks) for m in model.modules()) == n_hooks
        assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
        assert model.training
    # A capture after two others on the same model equals one on a fresh copy: nothing leaked.
    fresh = tiny_model("llama")
    with GradientCapture(model, "factgrass:k=16,k_in=6,k_out=5") as a, \
            GradientCapture(fresh, "factgrass:k=16,k_in=6,k_out=5") as b:
        ra, rb = a(ids), b(ids)
    for name in ra.grads:
        torch.testing.assert_close(ra.grads[name], rb.grads[name], rtol=0, atol=0)


@pytest.mark.parametrize("reentrant", [True, False])
def test_gradient_checkpointing_gives_identical_results(reentrant):
    model = tiny_model("llama", dtype=torch.float64)
    batch = pad_batch(make_examples(), "right")
    spec = "factgrass:k=16,k_in=6,k_out=5"
    with GradientCapture(model, spec) as cap:
        plain = cap(*batch)
    model.activation_checkpointing_enable({"use_reentrant": reentrant})
    calls = []
    # q_proj, not the last Linear of the layer: non-reentrant checkpointing stops recomputing
    # as soon as the last saved tensor exists, before the last module's forward hooks run.
    counter = model.model.layers[0].self_attn.q_proj.register_forward_hook(
        lambda *a: calls.append(1))
    with GradientCapture(model, spec) as cap:
        ckpt = cap(*batch)
    counter.remove()
    assert len(calls) == 2  # checkpointing really ran: the layer was recomputed in backward
    for name in plain.grads:
        torch.testing.assert_close(ckpt.grads[name], plain.grads[name], **TOL64)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_low_precision_model_agrees_with_fp32(dtype):
    ref_model = tiny_model("llama", dtype=torch.float32)
    low_model = tiny_model("llama", dtype=dtype)
    batch = pad_batch(make_examples(), "right")
    spec = "factgrass:k=16,k_in=6,k_out=5"
    with GradientCapture(ref_model, spec) as cap:
        ref = cap(*batch)
    with GradientCapture(low_model, spec) as cap:
        low = cap(*batch)
    for name in ref.grads:
        assert low.grads[name].dtype == torch.float32  # compression math in fp32
        err = (low.grads[name] - ref.grads[name]).norm() / ref.grads[name].norm()
        # Unit round-off is 2^-8 (bf16) / 2^-11 (fp16) per stored value; weights, activations
        # and deltas are each rounded through 2 layers forward and back, which measured at
        # ~1-3% (bf16) and <0.5% (fp16) here. 10% / 3% leave headroom, while a wrong index map,
        # dtype overflow or missing upcast gives errors of order 100%.
        assert err < (0.10 if dtype == torch.bfloat16 else 0.03), (name, float(err))


def test_layer_selection_patterns_and_errors():
    model = tiny_model("llama")
    default = select_layers(model)
    assert len(default) == 2 * 7 and "lm_head" not in default
    with_head = select_layers(model, include=["model.layers.*", "lm_head"])
    assert "lm_head" in with_head and len(with_head) == 15
    mlp = select_layers(model, include=["re:mlp\\.(gate|up)_proj$"])
    assert sorted(mlp) == sorted(f"model.layers.{i}.mlp.{p}_proj" for i in (0, 1)
                                 for p in ("gate", "up"))
    no_k = select_layers(model, exclude=["*k_proj"])
    assert len(no_k) == 12
    with pytest.raises(ValueError, match="no Linear layer matches"):
        select_layers(model, include=["nothing*"])
    with GradientCapture(model, "factgrass:k=16,k_in=6,k_out=5",
                         layers=["model.layers.*", "lm_head"]) as cap:
        out = cap(torch.randint(0, 101, (2, 5)))
    assert out.grads["lm_head"].shape == (2, 16)


def test_bad_inputs_raise_clear_errors():
    model = tiny_model("llama")
    cap = GradientCapture(model, "factgrass:k=16,k_in=6,k_out=5")
    with pytest.raises(RuntimeError, match="context manager"):
        cap(torch.randint(0, 101, (2, 5)))
    with pytest.raises(ValueError, match="reduction"):
        GradientCapture(model, "factgrass:k=16,k_in=6,k_out=5", reduction="avg")
    with pytest.raises(ValueError, match="token_mode"):
        GradientCapture(model, "factgrass:k=16,k_in=6,k_out=5", token_mode="tokens")
    with pytest.raises(ValueError, match="does not fit layer .*k_in=60 must be"):
        GradientCapture(model, "factgrass:k=16,k_in=60,k_out=5")
    with cap:
        with pytest.raises(ValueError, match="attention_mask"):
            cap(torch.randint(0, 101, (2, 5)), torch.ones(2, 4))
        with pytest.raises(ValueError, match=r"\[B, T\]"):
            cap(torch.randint(0, 101, (5,)))
        with pytest.warns(UserWarning, match="no target"):
            cap(torch.randint(0, 101, (2, 5)), labels=torch.full((2, 5), IGNORE))


def test_mean_reduction_scales_each_example():
    model = tiny_model("llama", dtype=torch.float64)
    batch = pad_batch(make_examples(), "right")
    spec = "factgrass:k=16,k_in=6,k_out=5"
    with GradientCapture(model, spec) as cap:
        s = cap(*batch)
    with GradientCapture(model, spec, reduction="mean") as cap:
        m = cap(*batch)
    for name in s.grads:
        assert_rows_close(m.grads[name] * m.n_targets[:, None], s.grads[name])
