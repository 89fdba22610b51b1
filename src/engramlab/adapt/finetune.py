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
column, is dense. The optimiser is AdamW; rows are drawn in a seeded order, so a fine-tune is
reproducible.

Data is plain text (a :class:`~engramlab.data.corpus.TextCorpus`: next-token cross-entropy on
packed rows) or a task's prompt-completion rows (:class:`~engramlab.data.tasks.TaskRow`: the
loss falls on the completion and its end-of-text token only, as in instruction tuning).
``precision="bfloat16"`` runs the forward and backward under bfloat16 autocast while the
weights, the optimiser state and the returned delta stay float32 (mixed precision).
``checkpoint`` names a file the trained weights and the optimiser state are saved to every
``save_every`` steps; a run given the same file, settings and starting model resumes from it
and ends where an uninterrupted run would have (the row order is a function of the seed, and
the random state is saved too). The file is removed once the run completes.
"""

from __future__ import annotations

import random
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F

from .._io import atomic_file
from ..batching import pad_rows, target_ids
from ..data.corpus import TextCorpus
from ..data.tasks import TaskRow
from ..delta import ParamDelta, WeightDelta
from ..errors import InputError, RequestError
from ..models.lm import LM

MODES = ("full", "edited", "non-edited", "lora", "dora")
PRECISIONS = ("float32", "bfloat16")
IGNORE = -100  # cross-entropy's ignore_index: positions that carry no loss


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
    precision: str = "float32"
    save_every: int = 25  # steps between checkpoints, when a checkpoint file is given

    def __post_init__(self) -> None:
        if self.mode not in MODES:
            raise RequestError(f"unknown fine-tuning mode {self.mode!r}; choose one of {MODES}")
        if self.precision not in PRECISIONS:
            raise RequestError(f"unknown precision {self.precision!r}; choose one of "
                               f"{PRECISIONS}")
        if self.steps < 0:
            raise RequestError("fine-tuning steps must be 0 or more (0: no training)")
        for name in ("batch_size", "seq_len", "rank", "save_every"):
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


def finetune(lm: LM, data: TextCorpus | Sequence[TaskRow], config: FinetuneConfig | None = None,
             *, edited: Sequence[str] | WeightDelta = (), adapter_out: str | Path | None = None,
             checkpoint: str | Path | None = None, progress: bool = False) -> FinetuneResult:
    """Fine-tune ``lm`` on ``data`` and return what changed; the model is left unchanged."""
    config = config or FinetuneConfig()
    rows = training_rows(lm, data, config)
    order = _row_order(len(rows[0]), config)
    saver = _Checkpoint(Path(checkpoint), config, lm.fingerprint()) if checkpoint else None
    if config.mode in ("lora", "dora"):
        return _adapter(lm, rows, order, config, adapter_out, saver, progress)
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
        losses = _train(lm, lm.model, rows, order, opt, config, saver, progress)
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


Rows = tuple[torch.Tensor, torch.Tensor]  # token ids and targets (IGNORE: no loss), [rows, len]


def training_rows(lm: LM, data: TextCorpus | Sequence[TaskRow], config: FinetuneConfig) -> Rows:
    """Token rows and their targets: packed text trains every token; a task row trains its
    completion and the end-of-text token after it, never its prompt."""
    if isinstance(data, TextCorpus):
        ids = data.token_rows(lm, seq_len=config.seq_len,
                              max_tokens=max(config.steps, 1) * config.batch_size
                              * config.seq_len)
        return ids, ids.clone()
    rows = list(data)
    if not rows:
        raise InputError("the fine-tuning task has no rows")
    eos = lm.tokenizer.eos_token_id
    tokens, starts = [], []
    for row in rows:
        prompt = lm.tokenizer(row.prompt)["input_ids"]
        seq = [*prompt, *target_ids(lm, row.prompt, row.completion)]
        seq = (seq + ([eos] if eos is not None else []))[:config.seq_len]
        tokens.append(seq)
        starts.append(len(prompt))
    ids, _ = pad_rows(lm, tokens)
    targets = torch.full_like(ids, IGNORE)
    for i, (seq, start) in enumerate(zip(tokens, starts, strict=True)):
        targets[i, start:len(seq)] = ids[i, start:len(seq)]
    if not bool((targets[:, 1:] != IGNORE).any()):
        raise InputError("no task row leaves a completion token within seq_len; raise seq_len")
    return ids, targets


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


def _train(lm: LM, model: torch.nn.Module, rows: Rows, order: list[int],
           opt: torch.optim.Optimizer, config: FinetuneConfig, saver: _Checkpoint | None,
           progress: bool) -> list[float]:
    from tqdm.auto import tqdm

    ids_all, targets_all = rows
    torch.manual_seed(config.seed)  # dropout, where the model has it
    trained = {n: p for n, p in model.named_parameters() if p.requires_grad}
    first, losses = saver.resume(trained, opt) if saver is not None else (0, [])
    model.train()  # the caller puts the model back in the mode it was in
    autocast = torch.autocast(device_type=lm.device.type, dtype=torch.bfloat16,
                              enabled=config.precision == "bfloat16")
    bar = tqdm(total=config.steps, initial=first, desc=f"fine-tune ({config.mode})",
               unit="step", disable=not progress)
    with bar:
        for step in range(first, config.steps):
            idx = order[step * config.batch_size:(step + 1) * config.batch_size]
            targets = targets_all[idx].to(lm.device)
            # task rows pad to the longest row of the set; this batch needs only its own
            width = int((targets != IGNORE).nonzero()[:, 1].max()) + 1 \
                if bool((targets != IGNORE).any()) else targets.shape[1]
            ids, targets = ids_all[idx, :width].to(lm.device), targets[:, :width]
            with autocast:
                logits = model(input_ids=ids).logits
            loss = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(),
                                   targets[:, 1:].flatten(), ignore_index=IGNORE)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
            bar.update(1)
            if saver is not None and (step + 1) % config.save_every == 0 \
                    and step + 1 < config.steps:
                saver.save(step + 1, trained, opt, losses)
    if saver is not None:
        saver.path.unlink(missing_ok=True)  # the run is complete: nothing to resume
    return losses


class _Checkpoint:
    """A fine-tune's trained weights, optimiser state and losses after some step, in one file
    (written atomically), valid only for the same settings and the same starting model."""

    def __init__(self, path: Path, config: FinetuneConfig, model_fingerprint: str) -> None:
        self.path = path
        self.key = {"config": {k: v for k, v in vars(config).items() if k != "save_every"},
                    "model": model_fingerprint}

    def resume(self, params: dict[str, torch.nn.Parameter],
               opt: torch.optim.Optimizer) -> tuple[int, list[float]]:
        """Load the saved state into ``params`` and ``opt``: (step to go on from, losses)."""
        if not self.path.is_file():
            return 0, []
        try:
            state = torch.load(self.path, map_location="cpu", weights_only=False)
        except Exception as e:  # a truncated or foreign file
            raise InputError(f"checkpoint {self.path} cannot be read ({type(e).__name__}); "
                             "delete it to start afresh") from None
        if state.get("key") != self.key or set(state.get("params", {})) != set(params):
            raise InputError(f"checkpoint {self.path} belongs to another fine-tune (settings, "
                             "data or starting model differ); delete it or pass another file")
        with torch.no_grad():
            for n, p in params.items():
                p.copy_(state["params"][n])
        opt.load_state_dict(state["opt"])
        torch.set_rng_state(state["rng"])  # dropout goes on as it would have
        return int(state["step"]), list(state["losses"])

    def save(self, step: int, params: dict[str, torch.nn.Parameter],
             opt: torch.optim.Optimizer, losses: list[float]) -> None:
        state = {"key": self.key, "step": step, "losses": losses, "opt": opt.state_dict(),
                 "rng": torch.get_rng_state(),
                 "params": {n: p.detach().cpu() for n, p in params.items()}}
        with atomic_file(self.path) as tmp:
            torch.save(state, tmp)


def _adapter(lm: LM, rows: Rows, order: list[int], config: FinetuneConfig,
             adapter_out: str | Path | None, saver: _Checkpoint | None,
             progress: bool) -> FinetuneResult:
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
        losses = _train(lm, model, rows, order, opt, config, saver, progress)
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
