"""Named hook points: capture, replace or add to activations inside a ``with`` block.

Every activation the rest of engramlab touches has a name (as in TransformerLens), and every
intervention is a context manager whose hooks are removed on exit, also when the body raises
(as in nnsight / ROME's ``nethook``). Points:

==============  ===========================================================================
``embed``       residual stream entering block 0 (token + position embeddings, any scaling)
``resid.{i}``   output of block ``i`` (the residual stream after it)
``attn_out.{i}``output of block ``i``'s attention module (its contribution before any post-norm)
``mlp_key.{i}`` input of block ``i``'s MLP down/value projection: the ``d_mlp`` "keys"
``mlp_out.{i}`` output of that projection: the value written by the MLP
==============  ===========================================================================

Edits run before captures at the same point, so a capture shows what the model actually used.
Gradients flow through edits and (with ``detach=False``) through captures, which is what target
optimisation needs. ``positions`` select tokens: ``None`` (all), an ``int`` (same position in
every row, negative from the end of the padded sequence), a per-row sequence of ints or of lists
of ints, or a boolean ``[batch, seq]`` mask.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from typing import Any

import torch
from torch import nn

from .errors import PointError
from .models.lm import LM

Positions = int | Sequence[int] | Sequence[Sequence[int]] | torch.Tensor | None
EditFn = Callable[[torch.Tensor], torch.Tensor]

POINT_KINDS = ("embed", "resid", "attn_out", "mlp_key", "mlp_out")


def parse_point(lm: LM, point: str) -> tuple[str, int]:
    """``"resid.5"`` -> ``("resid", 5)``, with errors that list the valid names and ranges."""
    if point == "embed":
        return "embed", 0
    kind, _, idx = point.partition(".")
    if kind not in POINT_KINDS or kind == "embed" or not idx.lstrip("-").isdigit():
        raise PointError(
            f"unknown hook point {point!r}; use 'embed' or one of "
            f"{', '.join(k + '.{i}' for k in POINT_KINDS[1:])} with 0 <= i < {lm.n_layers}"
        )
    layer = int(idx)
    if not 0 <= layer < lm.n_layers:
        raise PointError(
            f"hook point {point!r}: layer {layer} out of range for a {lm.n_layers}-layer model "
            f"(0..{lm.n_layers - 1})"
        )
    return kind, layer


def position_mask(positions: Positions, batch: int, seq: int, device: torch.device) -> torch.Tensor:
    """A boolean ``[batch, seq]`` mask for any accepted ``positions`` form."""
    if positions is None:
        return torch.ones(batch, seq, dtype=torch.bool, device=device)
    if isinstance(positions, torch.Tensor) and positions.dtype == torch.bool:
        if tuple(positions.shape) != (batch, seq):
            raise PointError(f"position mask has shape {tuple(positions.shape)}, "
                             f"activations are [{batch}, {seq}]")
        return positions.to(device)
    mask = torch.zeros(batch, seq, dtype=torch.bool, device=device)
    if isinstance(positions, int):
        mask[:, positions] = True
        return mask
    rows = positions.tolist() if isinstance(positions, torch.Tensor) else list(positions)
    if len(rows) != batch:
        raise PointError(f"positions give {len(rows)} rows for a batch of {batch}; pass one int "
                         "or one entry (int or list of ints) per row")
    for r, pos in enumerate(rows):
        for p in [pos] if isinstance(pos, int) else pos:
            if not -seq <= p < seq:
                raise PointError(f"position {p} out of range for sequence length {seq} (row {r})")
            mask[r, p] = True
    return mask


def _main(value: Any) -> torch.Tensor:
    return value[0] if isinstance(value, tuple) else value


def _with_main(value: Any, new: torch.Tensor) -> Any:
    return (new, *value[1:]) if isinstance(value, tuple) else new


class Trace:
    """Hooks on named points, active inside ``with``.

    >>> with Trace(lm).capture("mlp_key.3").add("resid.5", v, positions=-1) as tr:
    ...     lm.model(**lm.tokenize("The Eiffel Tower is in"))
    >>> tr["mlp_key.3"].shape
    """

    def __init__(self, lm: LM) -> None:
        self.lm = lm
        self._edits: dict[str, list[EditFn]] = {}
        self._captures: dict[str, bool] = {}
        self._handles: list[Any] = []
        self.cache: dict[str, torch.Tensor] = {}
        # captures are handed back on the inputs' device, wherever a dispatched block ran
        self._home = lm.device

    # declaring -------------------------------------------------------------------------
    def capture(self, *points: str, detach: bool = True) -> Trace:
        for point in points:
            parse_point(self.lm, point)
            self._captures[point] = detach
        return self

    def edit(self, point: str, fn: EditFn) -> Trace:
        """Replace the activation by ``fn(activation)`` (a ``[batch, seq, dim]`` tensor)."""
        parse_point(self.lm, point)
        self._edits.setdefault(point, []).append(fn)
        return self

    def add(self, point: str, value: torch.Tensor, positions: Positions = None) -> Trace:
        """Add ``value`` (``[dim]`` or per-row ``[batch, dim]``) at the selected positions."""

        def fn(t: torch.Tensor) -> torch.Tensor:
            mask = position_mask(positions, t.shape[0], t.shape[1], t.device)
            v = value.to(device=t.device, dtype=t.dtype)
            v = v.view(1, 1, -1) if v.dim() == 1 else v.view(v.shape[0], 1, -1)
            return t + mask.unsqueeze(-1).to(t.dtype) * v

        return self.edit(point, fn)

    def replace(self, point: str, value: torch.Tensor, positions: Positions = None) -> Trace:
        """Overwrite the activation with ``value`` (``[dim]``, ``[batch, dim]`` or full shape)."""

        def fn(t: torch.Tensor) -> torch.Tensor:
            mask = position_mask(positions, t.shape[0], t.shape[1], t.device)
            v = value.to(device=t.device, dtype=t.dtype)
            if v.dim() == 1:
                v = v.view(1, 1, -1)
            elif v.dim() == 2:
                v = v.view(v.shape[0], 1, -1)
            return torch.where(mask.unsqueeze(-1), v.expand_as(t), t)

        return self.edit(point, fn)

    def __getitem__(self, point: str) -> torch.Tensor:
        if point not in self.cache:
            raise PointError(f"nothing captured at {point!r}; captured: {sorted(self.cache)}")
        return self.cache[point]

    # hooks -----------------------------------------------------------------------------
    def _process(self, point: str, t: torch.Tensor) -> torch.Tensor:
        for fn in self._edits.get(point, ()):
            t = fn(t)
        if point in self._captures:
            kept = t.detach() if self._captures[point] else t
            self.cache[point] = kept.to(self._home)
        return t

    def _module_and_style(self, point: str) -> tuple[nn.Module, str]:
        kind, layer = parse_point(self.lm, point)
        layout = self.lm.layout
        if kind == "embed":
            return layout.block(0), "pre"
        if kind == "resid":
            return layout.block(layer), "post"
        if kind == "attn_out":
            return layout.attn(layer), "post"
        if kind == "mlp_key":
            return layout.value_module(layer), "pre"
        return layout.value_module(layer), "post"

    def _register(self, point: str) -> None:
        module, style = self._module_and_style(point)
        if style == "post":

            def post_hook(_m: nn.Module, _args: Any, output: Any) -> Any:
                return _with_main(output, self._process(point, _main(output)))

            self._handles.append(module.register_forward_hook(post_hook))
        else:

            def pre_hook(_m: nn.Module, args: tuple, kwargs: dict) -> Any:
                if args:
                    return (self._process(point, args[0]), *args[1:]), kwargs
                kwargs = dict(kwargs)
                kwargs["hidden_states"] = self._process(point, kwargs["hidden_states"])
                return args, kwargs

            self._handles.append(module.register_forward_pre_hook(pre_hook, with_kwargs=True))

    def __enter__(self) -> Trace:
        self.cache.clear()
        try:
            for point in dict.fromkeys([*self._edits, *self._captures]):
                self._register(point)
        except BaseException:
            self.close()
            raise
        return self

    def close(self) -> None:
        for handle in self._handles:
            handle.remove()
        self._handles.clear()

    def __exit__(self, *exc: object) -> None:
        self.close()


@contextmanager
def started_at(lm: LM, layer: int, hidden: torch.Tensor) -> Iterator[None]:
    """Inside the block, a forward of the model begins at block ``layer`` with ``hidden``
    (``[batch, seq, d_model]``, e.g. a captured ``resid.{layer-1}``) as that block's input. The
    earlier blocks cost nothing and hooks on them (``embed`` included) do not fire; a key/value
    cache passed to the forward grows only in the blocks that run."""
    if layer <= 0:
        yield
        return

    def begin(_m: nn.Module, args: tuple, kwargs: dict) -> Any:
        if args:
            return (hidden.to(args[0].dtype), *args[1:]), kwargs
        return args, {**kwargs, "hidden_states": hidden.to(kwargs["hidden_states"].dtype)}

    handle = lm.layout.block(layer).register_forward_pre_hook(begin, with_kwargs=True,
                                                             prepend=True)
    try:
        with lm.layout.blocks_from(layer):
            yield
    finally:
        handle.remove()


class _Stop(Exception):
    """Raised by a hook to end a forward pass once the last needed block has run."""


def run_model(lm: LM, input_ids: torch.Tensor, attention_mask: torch.Tensor | None = None, *,
              stop_after: int | None = None, logits: bool = False,
              start: tuple[int, torch.Tensor] | None = None) -> Any:
    """Forward ``input_ids`` through the model; hooks already entered see it as usual.

    Without ``logits`` only the transformer body runs (no unembedding over every position, which
    for a small model with a large vocabulary is a fifth of the work); read final states with a
    ``resid.{n_layers-1}`` capture and :meth:`LM.logits_from_hidden` at the positions you need.
    ``stop_after=i`` ends the pass after block ``i``: captures up to there are complete and the
    later blocks cost nothing. ``start=(i, hidden)`` begins at block ``i`` with ``hidden``
    (``[batch, seq, d_model]``, e.g. a captured ``resid.{i-1}``) as its input: the earlier
    blocks cost nothing, and hooks on them (``embed`` included) do not fire.
    """
    if start is not None and start[0] > 0:
        with started_at(lm, *start):
            return run_model(lm, input_ids, attention_mask, stop_after=stop_after, logits=logits)
    model = lm.model if logits else lm.body
    kwargs: dict[str, Any] = {"input_ids": input_ids, "use_cache": False}
    if attention_mask is not None:
        kwargs["attention_mask"] = attention_mask
    if stop_after is None or stop_after >= lm.n_layers - 1:
        return model(**kwargs)

    def stop(_m: nn.Module, _a: Any, _o: Any) -> None:
        raise _Stop

    handle = lm.layout.block(stop_after).register_forward_hook(stop)
    try:
        model(**kwargs)
    except _Stop:
        return None
    finally:
        handle.remove()
    return None


def deepest_block(lm: LM, points: Sequence[str]) -> int:
    """The last block a forward must run for every point in ``points`` to be seen."""
    return max(parse_point(lm, point)[1] for point in points)


def record(lm: LM, texts: str | Sequence[str], points: Sequence[str]) -> dict[str, torch.Tensor]:
    """One no-grad forward over ``texts``; returns the captured activations and the mask."""
    enc = lm.tokenize(texts)
    with torch.no_grad(), Trace(lm).capture(*points) as tr:
        run_model(lm, enc["input_ids"], enc["attention_mask"],
                  stop_after=deepest_block(lm, points))
    out = dict(tr.cache)
    out["attention_mask"] = enc["attention_mask"]
    return out
