"""The next-token loss: the blocked path for large logits against float64 cross-entropy, and
the memory it exists to save."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

from grass_llm.capture import loss
from grass_llm.capture.loss import IGNORE, per_example_loss

ROOT = Path(__file__).resolve().parents[1]
DEVICES = ["cpu", pytest.param("cuda", marks=pytest.mark.skipif(
    not torch.cuda.is_available(), reason="no GPU: the CUDA path runs where one is lent"))]


def _reference(logits, labels, reduction):
    """float64 ``F.cross_entropy`` on the flattened shifted logits, summed per example."""
    lg, t = logits[:, :-1].double(), labels[:, 1:]
    nll = F.cross_entropy(lg.reshape(-1, lg.shape[-1]), t.reshape(-1), ignore_index=IGNORE,
                          reduction="none").view(t.shape).sum(1)
    return nll / (t != IGNORE).sum(1).clamp_min(1) if reduction == "mean" else nll


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float64])
# 3 x 11 x 50 logits in blocks of one row, part of one sequence, two whole sequences
@pytest.mark.parametrize("chunk_numel", [37, 230, 1100])
@pytest.mark.parametrize("reduction", ["sum", "mean"])
@pytest.mark.parametrize("device", DEVICES)
def test_blocked_loss_and_its_gradient_equal_float64_cross_entropy(monkeypatch, dtype,
                                                                   chunk_numel, reduction,
                                                                   device):
    monkeypatch.setattr(loss, "BLOCK_NUMEL", {"cpu": chunk_numel, "other": chunk_numel})
    gen = torch.Generator().manual_seed(0)
    B, T, V = 3, 11, 50
    logits = (torch.randn(B, T, V, generator=gen) * 3).to(device, dtype).requires_grad_()
    labels = torch.randint(0, V, (B, T), generator=gen).to(device)
    labels[0, 3:6] = IGNORE
    labels[2] = IGNORE  # an example with no target
    weights = torch.randn(B, generator=gen, dtype=torch.float64).to(device)
    got, n = per_example_loss(logits, labels, reduction)
    (got.double() * weights).sum().backward()
    ref_logits = logits.detach().double().requires_grad_()
    ref = _reference(ref_logits, labels, reduction)
    (ref * weights).sum().backward()
    assert got.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert n.tolist() == [7, 10, 0]
    tol = {torch.float64: 1e-12, torch.float32: 1e-5, torch.bfloat16: 1e-5}[dtype]
    torch.testing.assert_close(got.double(), ref, rtol=tol, atol=tol)
    assert logits.grad.dtype == dtype
    # the gradient is rounded once to the logits' dtype (bfloat16: 8 bits)
    gtol = {torch.float64: 1e-12, torch.float32: 1e-6, torch.bfloat16: 2e-2}[dtype]
    torch.testing.assert_close(logits.grad.double(), ref_logits.grad, rtol=gtol, atol=gtol)
    assert not logits.grad[:, -1].any() and not logits.grad[2].any()


def test_small_logits_take_the_fused_path_with_the_same_numbers(monkeypatch):
    gen = torch.Generator().manual_seed(1)
    logits = torch.randn(2, 9, 40, generator=gen, dtype=torch.float64)
    labels = torch.randint(0, 40, (2, 9), generator=gen)
    fused = per_example_loss(logits, labels)[0]
    monkeypatch.setattr(loss, "BLOCK_NUMEL", {"cpu": 100, "other": 100})
    calls = []
    real = loss._NextTokenNLL.apply
    monkeypatch.setattr(loss._NextTokenNLL, "apply", lambda *a: calls.append(1) or real(*a))
    blocked = per_example_loss(logits, labels)[0]
    assert calls == [1]
    torch.testing.assert_close(blocked, fused, rtol=1e-13, atol=1e-13)


def _grew(chunk_numel: int) -> float:
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", OMP_NUM_THREADS="2")
    res = subprocess.run([sys.executable, "-m", "tests.loss_probe", str(chunk_numel)],
                         cwd=ROOT, env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr[-3000:]
    return json.loads(res.stdout.strip().splitlines()[-1])["grew_over_logits"]


def test_large_logits_cost_their_gradient_alone_in_host_memory():
    # 200 MiB of float32 logits (4 x 256 x 49152). Measured: the blocked path adds 1.03x the
    # logits (their gradient); torch's cross-entropy on the flattened logits 3.02x (a copy of
    # the shifted view, the saved log-softmax, and the gradient through both)
    blocked = _grew(loss.BLOCK_NUMEL["cpu"])
    fused = _grew(1 << 40)
    print(f"peak host memory added, over the logits' size: blocked {blocked:.2f}, "
          f"fused {fused:.2f}")
    assert blocked < 1.3 < 2.5 < fused, (blocked, fused)


def test_capture_rows_through_the_blocked_loss_equal_the_fused_ones(monkeypatch):
    # the whole capture with the loss's gradient from the blocks (and position mode, whose
    # rows follow each token's own loss gradient) against the fused path, float64
    from grass_llm.capture import GradientCapture
    from grass_llm.models import tiny_model
    from tests.test_capture import TOL64, make_examples, pad_batch

    model = tiny_model("llama", dtype=torch.float64)
    batch = pad_batch(make_examples(), "left")
    spec = "factgrass:k=16,k_in=6,k_out=5"
    runs = []
    real = loss._NextTokenNLL.apply
    for block in (1 << 40, 64):  # fused (one call), then blocks of one row of 101 logits
        monkeypatch.setattr(loss, "BLOCK_NUMEL", {"cpu": block, "other": block})
        calls = []
        monkeypatch.setattr(loss._NextTokenNLL, "apply", lambda *a: calls.append(1) or real(*a))
        with GradientCapture(model, spec, seed=0) as cap:
            per_example = cap(*batch)
        with GradientCapture(model, spec, seed=0, token_mode="position") as cap:
            per_position = cap(*batch)
        runs.append((bool(calls), per_example, per_position))
    assert [used for used, *_ in runs] == [False, True]
    (_, fused, fused_pos), (_, blocked, blocked_pos) = runs
    torch.testing.assert_close(blocked.loss, fused.loss, **TOL64)
    for name in fused.grads:
        torch.testing.assert_close(blocked.grads[name], fused.grads[name], **TOL64)
        torch.testing.assert_close(blocked_pos.grads[name], fused_pos.grads[name], **TOL64)
