"""Fine-tuning a loaded model, expressed as a :class:`~engramlab.WeightDelta`.

Do edits survive adaptation (Cheng et al., "Can Fine-Tuning Erase Your Edits? On the Fragile
Coexistence of Knowledge Editing and Adaptation")? To measure it a fine-tune must be an object
like an edit: :func:`finetune` trains, then hands back what training changed as a delta and
leaves the model as it found it, so the fine-tune can be applied, reverted, saved and compared
with the edit it meets.

Modes (:data:`MODES`): ``full`` trains every parameter; ``edited`` only the parameters a given
edit changed (its delta's names); ``non-edited`` every parameter but those; ``lora`` and
``dora`` train PEFT adapters (Hu et al. 2022; Liu et al. 2024) on the model's linear layers, or
on ``target_modules``, and can be saved as a standard PEFT adapter folder that ``peft`` loads
back. LoRA's delta is low-rank (``scaling · B A`` per module); DoRA's, which rescales each
column, is dense. The loss is next-token cross-entropy on packed rows of the text, the
optimiser AdamW; rows are drawn in a seeded order, so a fine-tune is reproducible.

Not here yet: mixed precision, resuming from a checkpoint, and instruction data with
prompt/answer masking (every token is trained on).
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from ..data.corpus import TextCorpus
from ..delta import ParamDelta, WeightDelta
from ..errors import RequestError
from ..models.lm import LM

MODES = ("full", "edited", "non-edited", "lora", "dora")


@dataclass
class FinetuneConfig:
    mode: str = "full"
    steps: int = 50
    lr: float = 1e-4
    batch_size: int = 4
    seq_len: int = 128
    weight_decay: float = 0.0
    seed: int = 0
    rank: int = 8  # lora / dora
    alpha: float = 16.0
    target_modules: list[str] | str = "all-linear"

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise RequestError(f"unknown fine-tuning mode {self.mode!r}; choose one of {MODES}")
        for name in ("steps", "batch_size", "seq_len", "rank"):
            if getattr(self, name) < 1:
                raise RequestError(f"fine-tuning {name} must be at least 1")
        if not self.lr > 0:
            raise RequestError("fine-tuning lr must be positive")


@dataclass
class FinetuneResult:
    """The change (``delta``), the training loss per step, and where the adapter was saved."""

    delta: WeightDelta
    losses: list[float] = field(default_factory=list)
    adapter: Path | None = None


def trainable_names(lm: LM, mode: str, edited: Sequence[str] | WeightDelta = ()) -> list[str]:
    """The parameters a full-weight mode trains: all, the edited ones, or all but those."""
    names = [n for n, _ in lm.model.named_parameters()]
    chosen = list(edited.entries) if isinstance(edited, WeightDelta) else list(edited)
    unknown = sorted(set(chosen) - set(names))
    if unknown:
        raise RequestError(f"no parameters named {unknown[:3]} in this model")
    if mode == "full":
        return names
    if mode in ("edited", "non-edited") and not chosen:
        raise RequestError(f"mode {mode!r} needs the edit (its delta) to know which "
                           "parameters it changed")
    if mode == "edited":
        return [n for n in names if n in chosen]
    if mode == "non-edited":
        return [n for n in names if n not in chosen]
    raise RequestError(f"mode {mode!r} trains adapters, not named parameters")


def finetune(lm: LM, corpus: TextCorpus, config: FinetuneConfig | None = None, *,
             edited: Sequence[str] | WeightDelta = (), adapter_out: str | Path | None = None,
             progress: bool = False) -> FinetuneResult:
    """Fine-tune ``lm`` on ``corpus`` and return what changed; the model is left unchanged."""
    config = config or FinetuneConfig()
    rows = corpus.token_rows(lm, seq_len=config.seq_len,
                             max_tokens=config.steps * config.batch_size * config.seq_len)
    order = _row_order(len(rows), config)
    if config.mode in ("lora", "dora"):
        return _adapter(lm, rows, order, config, adapter_out, progress)
    if adapter_out is not None:
        raise RequestError(f"mode {config.mode!r} trains the weights themselves; there is no "
                           "adapter to save (save the returned delta instead)")
    names = set(trainable_names(lm, config.mode, edited))
    params = dict(lm.model.named_parameters())
    # tied weights (SmolLM2's embedding and unembedding) are one tensor under two names
    trained = {n: p for n, p in params.items() if n in names}
    before = {n: p.detach().clone() for n, p in trained.items()}
    flags = {n: p.requires_grad for n, p in params.items()}
    was_training = lm.model.training
    try:
        for n, p in params.items():
            p.requires_grad_(n in names)
        opt = torch.optim.AdamW([p for p in trained.values() if p.requires_grad], lr=config.lr,
                                weight_decay=config.weight_decay)
        losses = _train(lm, lm.model, rows, order, opt, config, progress)
        entries = {n: ParamDelta(dense=(p.detach() - before[n]).cpu())
                   for n, p in trained.items()}
    finally:
        with torch.no_grad():
            for n, p in trained.items():
                p.copy_(before[n])
        for n, p in params.items():
            p.requires_grad_(flags[n])
        lm.model.train(was_training)
        lm.invalidate_fingerprint()
    delta = WeightDelta.for_model(lm, entries, method=f"finetune:{config.mode}",
                                  steps=config.steps, lr=config.lr, seed=config.seed)
    return FinetuneResult(delta, losses)


def _row_order(n_rows: int, config: FinetuneConfig) -> list[int]:
    """Row indices for every step, a seeded permutation repeated as often as needed."""
    rng = random.Random(config.seed)
    need = config.steps * config.batch_size
    order: list[int] = []
    while len(order) < need:
        perm = list(range(n_rows))
        rng.shuffle(perm)
        order += perm
    return order[:need]


def _train(lm: LM, model: torch.nn.Module, rows: torch.Tensor, order: list[int],
           opt: torch.optim.Optimizer, config: FinetuneConfig, progress: bool) -> list[float]:
    from tqdm.auto import tqdm

    torch.manual_seed(config.seed)  # dropout, where the model has it
    losses = []
    model.train()  # the caller puts the model back in the mode it was in
    for step in tqdm(range(config.steps), desc=f"fine-tune ({config.mode})", unit="step",
                     disable=not progress):
        idx = order[step * config.batch_size:(step + 1) * config.batch_size]
        ids = rows[idx].to(lm.device)
        logits = model(input_ids=ids).logits
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), ids[:, 1:].flatten())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss.detach()))
    return losses


def _adapter(lm: LM, rows: torch.Tensor, order: list[int], config: FinetuneConfig,
             adapter_out: str | Path | None, progress: bool) -> FinetuneResult:
    """LoRA / DoRA with PEFT: train, save the adapter if asked, read the change, unload."""
    try:
        from peft import LoraConfig, get_peft_model
    except ImportError:
        raise RequestError("LoRA and DoRA need peft: pip install 'engramlab[adapt]'") from None
    peft_config = LoraConfig(r=config.rank, lora_alpha=config.alpha, lora_dropout=0.0,
                             target_modules=config.target_modules,
                             use_dora=config.mode == "dora", bias="none",
                             # GPT-2-style Conv1D layers store Wᵀ
                             fan_in_fan_out=lm.layout.value_is_transposed(0))
    torch.manual_seed(config.seed)  # the adapters' initialisation
    was_training = lm.model.training
    model = get_peft_model(lm.model, peft_config)
    saved, originals = None, {}
    try:
        trainable = [p for p in model.parameters() if p.requires_grad]
        opt = torch.optim.AdamW(trainable, lr=config.lr, weight_decay=config.weight_decay)
        losses = _train(lm, model, rows, order, opt, config, progress)
        if adapter_out is not None:
            saved = Path(adapter_out)
            model.save_pretrained(str(saved))
        if config.mode == "lora":
            entries = _lora_entries(model)
        else:  # DoRA rescales columns: the merged weights against the frozen originals
            originals = {name: m.base_layer.weight.detach().clone() for name, m in _adapted(model)}
            merged = dict(model.merge_and_unload().named_parameters())
            entries = {n: ParamDelta(dense=(merged[n].detach() - w).cpu())
                       for n, w in originals.items()}
    finally:  # the wrappers out (a no-op once merged), the merged weights back as they were
        base = dict(model.unload().named_parameters())
        with torch.no_grad():
            for n, w in originals.items():
                base[n].copy_(w)
        lm.model.train(was_training)
        lm.invalidate_fingerprint()
    delta = WeightDelta.for_model(lm, entries, method=f"finetune:{config.mode}",
                                  steps=config.steps, lr=config.lr, seed=config.seed,
                                  rank=config.rank)
    return FinetuneResult(delta, losses, saved)


def _adapted(model: torch.nn.Module) -> Iterator[tuple[str, Any]]:
    """Each module PEFT wrapped, under the base model's name of its weight (PEFT keeps the
    base weights frozen: training leaves them as they were)."""
    from peft.tuners.lora import LoraLayer

    for name, module in model.named_modules():
        if isinstance(module, LoraLayer) and "default" in module.lora_A:
            yield f"{name.removeprefix('base_model.model.')}.weight", module


def _lora_entries(model: torch.nn.Module) -> dict[str, ParamDelta]:
    """Each adapted module's change ``scaling · B A`` as low-rank factors."""
    entries = {}
    for name, module in _adapted(model):
        a = module.lora_A["default"].weight.detach().float().cpu()  # [r, in]
        b = module.lora_B["default"].weight.detach().float().cpu() * module.scaling["default"]
        if getattr(module, "fan_in_fan_out", False):  # GPT-2's Conv1D stores Wᵀ
            entries[name] = ParamDelta(u=a.T, v=b)
        else:
            entries[name] = ParamDelta(u=b, v=a.T)
    return entries
