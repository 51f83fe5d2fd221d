"""``grass-llm fit-mask``: learn FactGraSS's per-layer masks (the GraSS paper's selective mask)
from a calibration set, and write the mask file that a spec names with ``mask=PATH``.

Composition, like ``runner.py`` for ``cache`` (it reads the corpus, loads the model and hooks
it, so it sits at the same level, above ``compress``, which holds the math and the file
format): model and tokenizer -> calibration examples (a seeded sample of the training corpus
and of the target file, read and tokenized as ``cache`` does) -> exact per-example gradients
``G = sum_t delta_t x_t^T`` of the hooked layers (``GradientCapture`` with the ``identity``
compressor; layers in groups that fit ``memory_gb``, one pass over the calibration set per
group) -> ``compress.selective.fit_factorized_mask`` per layer -> ``compress.mask_file``.

One process. The fit costs O(steps * n_targets * n_train * d_out * d_in) per layer.
"""

from __future__ import annotations

import dataclasses
import time
from dataclasses import dataclass, field

import numpy as np
import torch

import grass_llm
from grass_llm.capture import GradientCapture
from grass_llm.capture.loss import REDUCTIONS
from grass_llm.compress import FactGraSS, derive_seed, fit_factorized_mask, parse_spec
from grass_llm.compress.mask_file import LayerMask, write_mask_file
from grass_llm.compress.selective import factorized_mask_correlation
from grass_llm.data import Example, collate, read_records, tokenize_records
from grass_llm.models import ADAPTER_LAYERS, load_model
from grass_llm.store.identity import dataset_fingerprint, model_identity

MODEL_DTYPES = ("float32", "bfloat16", "float16")


@dataclass(kw_only=True)
class FitMaskConfig:
    """What ``grass-llm fit-mask`` needs. Model, layers, bias, seed, reduction and length must
    be the ones of the ``cache`` run that will use the mask."""

    model: str
    """The model, as in a run config (directory, .gguf, ``smollm2``, ``tiny:<family>``)."""
    data: str
    """The training corpus (any format ``cache`` reads); the train side of the calibration."""
    targets: str
    """Target examples (queries, or examples whose attributions matter; same formats): the
    target side of the calibration. Use a held-out split, not the evaluation queries."""
    out: str
    """The mask file to write (safetensors)."""
    compressor: str = "factgrass:k=4096,k_in=128,k_out=128"
    """The FactGraSS spec the mask is for: its k_in and k_out are the mask sizes."""
    tokenizer: str | None = None
    """Tokenizer directory; default: the model's own."""
    adapter: str | None = None
    """A PEFT LoRA adapter on top of ``model`` (then its lora_A / lora_B layers are hooked)."""
    layers: list[str] | None = None
    """Layer name patterns (default: every Linear in the decoder)."""
    exclude: list[str] = field(default_factory=list)
    """Layer name patterns to leave out."""
    include_bias: bool = True
    """Give layers with a bias a bias column (it can then be part of S_in)."""
    seed: int = 0
    """Global seed: the run's (the random masks compared against), the sample, the fit."""
    reduction: str = "sum"
    """Per-example loss: ``sum`` or ``mean`` of target-token NLL."""
    dtype: str = "float32"
    """Model dtype (the gradients are float32 regardless)."""
    max_length: int = 1024
    """Longest sequence in tokens (longer documents are truncated)."""
    add_bos: bool | None = None
    """BOS before documents and prompts, as in the run config (null: as the tokenizer does)."""
    add_eos: bool | None = None
    """EOS (a target) after documents and completions, as in the run config (null: as the
    tokenizer does)."""
    n_train: int = 64
    """Training examples in the calibration set (a seeded sample of ``data``)."""
    n_targets: int = 32
    """Target examples in the calibration set (a seeded sample of ``targets``)."""
    batch_size: int = 8
    """Examples per forward/backward."""
    steps: int = 300
    """Adam steps of the fit, per layer."""
    lr: float = 0.01
    """Adam learning rate of the mask logits."""
    l1: float = 0.01
    """Weight of the sparsity penalty on the soft masks."""
    memory_gb: float = 4.0
    """Budget for the calibration gradients held at once (decides the layer groups)."""
    device: str = "auto"
    """``auto`` (CUDA when available), ``cpu`` or ``cuda[:N]``."""

    def __post_init__(self):
        for name in ("model", "data", "targets", "out"):
            if not getattr(self, name):
                raise ValueError(f"{name} is required")
        name, params = parse_spec(self.compressor)
        if name != "factgrass":
            raise ValueError(f"fit-mask learns FactGraSS masks; compressor must be a factgrass "
                             f"spec, got {self.compressor!r}")
        if {"mask", "mask_sha256"} & set(params):
            raise ValueError(f"compressor {self.compressor!r} already names a mask; give the "
                             "spec without mask= (the file is what fit-mask writes)")
        for fld, allowed in (("reduction", REDUCTIONS), ("dtype", MODEL_DTYPES)):
            if getattr(self, fld) not in allowed:
                raise ValueError(f"{fld} must be one of {list(allowed)}, got "
                                 f"{getattr(self, fld)!r}")
        for fld, low in (("n_train", 3), ("n_targets", 1), ("batch_size", 1),
                         ("max_length", 2), ("steps", 0), ("seed", 0)):
            if getattr(self, fld) < low:
                raise ValueError(f"{fld} must be >= {low}, got {getattr(self, fld)}")
        for fld in ("lr", "memory_gb"):
            if not getattr(self, fld) > 0:
                raise ValueError(f"{fld} must be > 0, got {getattr(self, fld)}")
        if self.l1 < 0:
            raise ValueError(f"l1 must be >= 0, got {self.l1}")
        for fld in ("add_bos", "add_eos"):
            if getattr(self, fld) is not None and not isinstance(getattr(self, fld), bool):
                raise ValueError(f"{fld} must be true, false or null, got "
                                 f"{getattr(self, fld)!r}")

    def to_dict(self) -> dict:
        return dataclasses.asdict(self)


@dataclass
class LayerResult:
    """One layer's fit: the objective of the learned and of the run's random masks."""

    name: str
    shape: str
    objective: float
    random_objective: float
    step: int


@dataclass
class FitMaskSummary:
    out: str
    sha256: str
    spec: str
    layers: list[LayerResult]
    n_train: int
    n_targets: int
    seconds: float


def _calibration(path: str, tok, cfg: FitMaskConfig, n: int, what: str) -> list[Example]:
    """A seeded sample of ``n`` examples of a corpus file, tokenized as ``cache`` does."""
    examples = tokenize_records(read_records(path).records, tok, max_length=cfg.max_length,
                                overflow="truncate", add_bos=cfg.add_bos,
                                add_eos=cfg.add_eos).examples
    minimum = 3 if what == "train" else 1
    if len(examples) < minimum:
        raise ValueError(f"{path}: {len(examples)} usable example(s); the calibration needs at "
                         f"least {minimum} {what} example(s)")
    rng = np.random.default_rng(derive_seed(cfg.seed, "fit-mask", what))
    pick = np.sort(rng.choice(len(examples), size=min(n, len(examples)), replace=False))
    return [examples[i] for i in pick]


def _groups(comps: dict[str, FactGraSS], n_rows: int, budget_bytes: float) -> list[list[str]]:
    """Consecutive layers whose float32 calibration gradients fit the budget together."""
    groups: list[list[str]] = [[]]
    used = 0
    for name, c in comps.items():
        size = 4 * n_rows * c.d_out * c.d_in_eff
        if groups[-1] and used + size > budget_bytes:
            groups.append([])
            used = 0
        groups[-1].append(name)
        used += size
    return groups


def _exact_grads(model, names: list[str], examples: list[Example], cfg: FitMaskConfig,
                 pad_id: int, device) -> dict[str, torch.Tensor]:
    """``{layer: [n, d_out * d_in_eff]}`` exact per-example gradients (row-major vec(G))."""
    out: dict[str, list[torch.Tensor]] = {n: [] for n in names}
    with GradientCapture(model, "identity", layers=names, seed=cfg.seed,
                         reduction=cfg.reduction, include_bias=cfg.include_bias) as cap:
        for a in range(0, len(examples), cfg.batch_size):
            b = collate(examples[a:a + cfg.batch_size], pad_id)
            res = cap(b["input_ids"].to(device), b["attention_mask"].to(device),
                      b["labels"].to(device))
            for n in names:
                out[n].append(res.grads[n].float())
    return {n: torch.cat(v) for n, v in out.items()}


def fit_layer(name: str, comp: FactGraSS, g_train: torch.Tensor, g_targets: torch.Tensor, *,
              steps: int, lr: float, l1: float, seed: int) -> tuple[LayerMask, LayerResult]:
    """Fit one layer's masks for ``comp`` (the run's random-mask FactGraSS of the layer, whose
    masks are the comparison) from exact gradients ``[n, d_out * d_in_eff]`` (row-major)."""
    shape = (comp.d_out, comp.d_in_eff)
    tr, te = g_train.view(-1, *shape), g_targets.view(-1, *shape)
    fit = fit_factorized_mask(tr, te, comp.k_in, comp.k_out, l1=l1, steps=steps, lr=lr,
                              seed=derive_seed(seed, name, "selective"))
    rand = factorized_mask_correlation(tr, te, comp.idx_in, comp.idx_out)
    mask = LayerMask(fit.idx_in, fit.idx_out, comp.d_in, comp.d_out, comp.bias, fit.objective,
                     rand)
    label = f"{comp.d_out} x {comp.d_in}{' +1' if comp.bias else ''}"
    return mask, LayerResult(name, label, fit.objective, rand, fit.step)


def _fingerprint(path: str, examples: list[Example]) -> dict:
    return {"path": path, **dataset_fingerprint((e.id, e.input_ids, e.labels)
                                                for e in examples)}


def run_fit_mask(cfg: FitMaskConfig, *, progress: bool = True) -> FitMaskSummary:
    """Fit every hooked layer's masks on the calibration set and write the mask file."""
    from tqdm.auto import tqdm

    t0 = time.perf_counter()
    device = torch.device(cfg.device if cfg.device != "auto"
                          else ("cuda" if torch.cuda.is_available() else "cpu"))
    model, tok, model_name = load_model(cfg.model, dtype=getattr(torch, cfg.dtype),
                                        tokenizer=cfg.tokenizer, seed=cfg.seed,
                                        adapter=cfg.adapter)
    model.to(device)
    layers = cfg.layers if cfg.layers is not None or cfg.adapter is None else ADAPTER_LAYERS
    # The run's own maps, layer by layer: sizes checked, and the random masks to compare with.
    probe = GradientCapture(model, cfg.compressor, layers=layers, exclude=cfg.exclude,
                            seed=cfg.seed, include_bias=cfg.include_bias)
    comps: dict[str, FactGraSS] = probe.compressors
    train = _calibration(cfg.data, tok, cfg, cfg.n_train, "train")
    targets = _calibration(cfg.targets, tok, cfg, cfg.n_targets, "targets")
    pad_id = tok.pad_token_id if tok.pad_token_id is not None else (tok.eos_token_id or 0)
    groups = _groups(comps, len(train) + len(targets), cfg.memory_gb * 2**30)
    fitted: dict[str, LayerMask] = {}
    results: list[LayerResult] = []
    bar = tqdm(total=len(comps), desc="fitting masks", unit="layer", disable=not progress,
               dynamic_ncols=True)
    for names in groups:
        g_tr = _exact_grads(model, names, train, cfg, pad_id, device)
        g_te = _exact_grads(model, names, targets, cfg, pad_id, device)
        for name in names:
            fitted[name], res = fit_layer(name, comps[name], g_tr.pop(name), g_te.pop(name),
                                          steps=cfg.steps, lr=cfg.lr, l1=cfg.l1, seed=cfg.seed)
            results.append(res)
            bar.update(1)
    bar.close()
    meta = {
        "grass_llm_version": grass_llm.__version__,
        "config": cfg.to_dict(),
        "model": model_identity(model, model_name),
        "calibration": {"train": _fingerprint(cfg.data, train),
                        "targets": _fingerprint(cfg.targets, targets)},
        "objective": "mean over targets q of corr over train i of <G_q[S], G_i[S]> vs "
                     "<G_q, G_i>, S = S_out x S_in (grass_llm.compress.selective)",
        "best_step": {r.name: r.step for r in results},
    }
    sha = write_mask_file(cfg.out, fitted, meta)
    return FitMaskSummary(cfg.out, sha, f"{cfg.compressor},mask={cfg.out}", results,
                          len(train), len(targets), time.perf_counter() - t0)


def config_from_cli(fields: dict, overrides: list[str]) -> FitMaskConfig:
    """The config from the command's options plus ``key=value`` overrides (YAML values)."""
    import yaml

    known = {f.name for f in dataclasses.fields(FitMaskConfig)}
    for item in overrides:
        key, eq, value = item.partition("=")
        key = key.strip().replace("-", "_")
        if not eq or key not in known:
            raise ValueError(f"--set {item!r}: expected KEY=VALUE with KEY one of "
                             f"{sorted(known - set(fields))}")
        fields[key] = yaml.safe_load(value) if value else None
    return FitMaskConfig(**fields)


def print_summary(console, s: FitMaskSummary, max_rows: int = 20) -> None:
    """The per-layer objective (learned vs random masks) and the spec to use."""
    from rich.table import Table

    table = Table(title=f"selective masks: objective on the calibration set ({s.n_train} train "
                        f"x {s.n_targets} targets; 1 = inner products preserved exactly)")
    for col in ("layer", "shape", "learned", "random", "best step"):
        table.add_column(col, justify="left" if col in ("layer", "shape") else "right")
    for r in s.layers[:max_rows]:
        table.add_row(r.name, r.shape, f"{r.objective:.3f}", f"{r.random_objective:.3f}",
                      str(r.step))
    if len(s.layers) > max_rows:
        table.add_row(f"... {len(s.layers) - max_rows} more", "", "", "", "")
    console.print(table)
    learned = np.mean([r.objective for r in s.layers])
    rand = np.mean([r.random_objective for r in s.layers])
    console.print(f"mean over {len(s.layers)} layers: learned {learned:.3f}, random {rand:.3f}; "
                  f"wrote {s.out} (sha256 {s.sha256[:12]}...) in {s.seconds:,.1f} s\n"
                  f"use it with the compressor spec: {s.spec}", highlight=False, soft_wrap=True)
