"""The capture's C++ hooks (grass_llm/capture/native.py, csrc/cpu/capture_hook.cpp): the rows
they give, and what they hand to the Python hooks."""

import pytest
import torch

from grass_llm import kernels
from grass_llm.capture import GradientCapture
from grass_llm.models import tiny_model
from tests.test_capture import (TOL64, PythonHooks, make_examples, pad_batch,
                                reference_vec_grads)

SPEC = "factgrass:k=16,k_in=6,k_out=5"

pytestmark = pytest.mark.skipif(kernels.extension() is None,
                                reason="the CPU extension is not built here")


class Counting(GradientCapture):
    """Counts the calls of the Python gradient hooks (the C++ path never calls them)."""

    def __init__(self, *a, **k):
        super().__init__(*a, **k)
        self.python_grad_hooks: list[str] = []

    def _grad_hook(self, name, *args):
        inner = super()._grad_hook(name, *args)

        def hook(grad):
            self.python_grad_hooks.append(name)
            return inner(grad)

        return hook


def _dense_rows(model, examples, comps):
    rows = []
    for ex_ids, ex_labels in examples:
        ref, _ = reference_vec_grads(model, ex_ids, ex_labels, comps)
        rows.append({n: c.dense_matrix() @ ref[n] for n, c in comps.items()})
    return rows


def test_native_hooks_give_the_python_hooks_rows_bitwise_and_the_dense_map():
    """Every FactGraSS layer (q/k/v with biases: qwen2) runs on the C++ hooks, with no Python
    gradient hook called; the rows equal the Python hooks' bit for bit, and the dense map of
    each example's own backward (float64)."""
    model = tiny_model("qwen2", dtype=torch.float64)
    examples = make_examples(lengths=[6, 4, 5])
    ids, mask, labels = pad_batch(examples)
    with Counting(model, SPEC, seed=3) as cap:
        assert set(cap._native.hooks) == set(cap.layers)
        first = cap(ids, mask, labels)
        again = cap(ids, mask, labels)  # a second step starts from clean state
        comps = cap.compressors
        assert cap.python_grad_hooks == []
    with PythonHooks(model, SPEC, seed=3) as cap:
        assert cap._native.hooks == {}
        py = cap(ids, mask, labels)
    for name in comps:
        assert torch.equal(first.grads[name], py.grads[name]), name
        assert torch.equal(again.grads[name], py.grads[name]), name
    for b, want in enumerate(_dense_rows(model, examples, comps)):
        for name in comps:
            torch.testing.assert_close(first.grads[name][b], want[name], **TOL64)


def test_native_hooks_pass_other_inputs_and_refused_gradients_to_the_checked_path():
    """A non-contiguous activation goes to the Python hooks; a non-contiguous output gradient,
    which the kernel does not take, is reduced after backward by the checked path. Both layers'
    rows still equal the dense map."""
    model = tiny_model("llama", dtype=torch.float64)
    block = model.model.layers[1]
    block.mlp.down_proj.register_forward_pre_hook(  # a transposed view of the same values
        lambda mod, args: (args[0].transpose(0, 1).contiguous().transpose(0, 1),))

    def strided_grad(mod, args, output):  # registered before the capture's: runs first
        output.register_hook(lambda g: g.transpose(0, 1).contiguous().transpose(0, 1))

    block.self_attn.o_proj.register_forward_hook(strided_grad)
    examples = make_examples(lengths=[6, 4, 5])
    ids, mask, labels = pad_batch(examples)
    with Counting(model, SPEC, seed=3) as cap:
        out = cap(ids, mask, labels)
        comps = cap.compressors
        assert cap.python_grad_hooks == ["model.layers.1.mlp.down_proj"]
    for b, want in enumerate(_dense_rows(model, examples, comps)):
        for name in comps:
            torch.testing.assert_close(out.grads[name][b], want[name], **TOL64)


def test_native_hooks_refuse_a_layer_called_twice_and_recover_on_the_next_step():
    """A module called twice in one forward gets two output gradients for one stored input:
    the step fails with the layer's name, and the next (normal) step gives the right rows."""
    model = tiny_model("llama", dtype=torch.float64)
    mlp = model.model.layers[0].mlp
    plain_forward = mlp.forward
    twice = {"on": True}

    def forward(x):
        return plain_forward(x) + (mlp.down_proj(mlp.up_proj(x)) if twice["on"] else 0)

    mlp.forward = forward
    examples = make_examples(lengths=[6, 4, 5])
    ids, mask, labels = pad_batch(examples)
    with GradientCapture(model, SPEC, seed=3) as cap:
        with pytest.raises(RuntimeError, match=r"layers\.0\.mlp\.(down|up)_proj"):
            cap(ids, mask, labels)
        twice["on"] = False
        out = cap(ids, mask, labels)
        comps = cap.compressors
    for b, want in enumerate(_dense_rows(model, examples, comps)):
        for name in comps:
            torch.testing.assert_close(out.grads[name][b], want[name], **TOL64)
