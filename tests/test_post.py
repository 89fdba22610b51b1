"""POST on tiny models: the student cut, distillation, DP-SGD's per-example gradients and the
transfer loss."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from engramlab.data.corpus import TextCorpus
from engramlab.errors import InputError
from engramlab.models.student import keep_layers
from engramlab.prompt import DPConfig, SoftPrompt, last_logits
from engramlab.prompt.post import (
    DistilConfig,
    TransferConfig,
    distil,
    save_student,
    spaced_layers,
    transfer,
    transfer_loss,
    transfer_objective,
)
from engramlab.prompt.soft import private_gradient
from tests.conftest import make_tiny, tiny_text
from tests.test_prompt import _task


def _skipping(block):
    """A forward hook that makes ``block`` pass its input through unchanged."""

    def hook(_m, args, kwargs, out):
        h = args[0] if args else kwargs["hidden_states"]
        return (h, *out[1:]) if isinstance(out, tuple) else h

    return block.register_forward_hook(hook, with_kwargs=True)


@pytest.mark.parametrize("family", ["llama", "gpt2", "gemma2"])
def test_a_student_is_the_teacher_with_the_other_blocks_skipped(family):
    lm = make_tiny(family)
    student = keep_layers(lm, [0, 2])
    assert student.n_layers == 2 and lm.n_layers == 3
    ids = torch.tensor([[5, 6, 7, 8, 9, 10]])
    handle = _skipping(lm.layout.block(1))
    try:
        want = lm.model(input_ids=ids).logits
    finally:
        handle.remove()
    got = student.model(input_ids=ids).logits
    assert torch.allclose(got, want, atol=1e-5)
    # the teacher is untouched
    assert not torch.allclose(lm.model(input_ids=ids).logits, want, atol=1e-4)
    assert spaced_layers(30, 6) == [0, 6, 12, 17, 23, 29]
    with pytest.raises(InputError, match="distinct and increasing"):
        keep_layers(lm, [2, 0])


def test_distillation_brings_the_student_closer_and_saves_a_model_folder(tmp_path):
    from engramlab import load_model

    teacher = make_tiny("llama")
    with torch.no_grad():  # peaked outputs, so that dropping a block matters
        teacher.layout.unembed.weight.mul_(20)
    corpus = TextCorpus([tiny_text(400, seed=s) for s in range(4)])
    ids = corpus.token_rows(teacher, seq_len=16)[:8]

    def gap(student):
        with torch.no_grad():
            t = F.log_softmax(teacher.model(input_ids=ids).logits, -1)
            s = F.log_softmax(student.model(input_ids=ids).logits, -1)
        return float(F.kl_div(s.flatten(0, 1), t.flatten(0, 1), log_target=True,
                              reduction="batchmean"))

    config = DistilConfig(keep=2, steps=60, lr=3e-4, batch_size=4, seq_len=16, alpha_clm=0.0,
                          alpha_ce=1.0)
    untrained = keep_layers(teacher, spaced_layers(3, 2))
    student = distil(teacher, corpus, config)
    assert gap(student) < 0.5 * gap(untrained)
    save_student(student, tmp_path / "student", {"teacher": "tiny"})
    back = load_model(str(tmp_path / "student"), progress=False)
    assert back.n_layers == 2
    assert torch.allclose(back.model(input_ids=ids).logits, student.model(input_ids=ids).logits,
                          atol=1e-5)


def test_dp_sgd_clips_every_examples_own_gradient():
    lm = make_tiny("llama")
    task = _task()
    rows = task.train[:6]
    ids = [lm.encode(" " + label)[0] for label in task.labels]
    prompt = torch.randn(3, lm.d_model, requires_grad=True)

    def loss_of(p, part):
        logits = last_logits(lm, p, [task.template.format(r.text) for r in part], ids)
        want = torch.tensor([task.labels.index(r.label) for r in part])
        return F.cross_entropy(logits, want)

    own = []
    for r in rows:
        (g,) = torch.autograd.grad(loss_of(prompt, [r]), prompt)
        own.append(g)
    own_t = torch.stack(own)
    # a bound above every norm clips nothing: the mean gradient
    big = float(own_t.flatten(1).norm(dim=1).max()) * 2
    private_gradient(prompt, rows, loss_of, big, None, torch.Generator())
    assert torch.allclose(prompt.grad, own_t.mean(0), atol=1e-6)
    # a small bound scales each example's gradient to it
    small = float(own_t.flatten(1).norm(dim=1).min()) / 2
    private_gradient(prompt, rows, loss_of, small, None, torch.Generator())
    scaled = own_t * (small / own_t.flatten(1).norm(dim=1))[:, None, None]
    assert torch.allclose(prompt.grad, scaled.mean(0), atol=1e-6)
    # more privacy costs more noise; none is refused
    sigmas = [DPConfig(epsilon=e).noise(2000, 16, 100)[0] for e in (1.0, 4.0, 16.0)]
    assert sigmas[0] > sigmas[1] > sigmas[2] > 0
    for bad in (0.0, -1.0, float("inf")):
        with pytest.raises(InputError, match="--dp-epsilon"):
            DPConfig(epsilon=bad).check()


def test_the_transfer_loss_is_zero_between_a_model_and_itself_and_training_lowers_it():
    lm = make_tiny("llama")
    with torch.no_grad():  # peaked outputs: prompts move them measurably
        lm.layout.unembed.weight.mul_(20)
    texts = ["w5 w6 w7 w3", "w8 w9 w3", "w10 w11 w12 w3"]
    prompt = torch.randn(4, lm.d_model)
    with torch.no_grad():
        prompted, plain = last_logits(lm, prompt, texts), last_logits(lm, None, texts)
        other = last_logits(lm, torch.randn(4, lm.d_model), texts)
    assert float(transfer_loss(prompted, plain, prompted, plain)) == pytest.approx(0, abs=1e-6)
    assert float(transfer_loss(prompted, plain, other, plain)) > 1e-3
    # transferring a prompt to the same model recovers its outputs
    task = _task()
    source = SoftPrompt(prompt * 0.05, {"task": "toy"})
    public = [" ".join(f"w{(7 * i + j) % 40 + 5}" for j in range(4)) for i in range(32)]
    config = TransferConfig(steps=30, lr=0.02, batch_size=8, eval_every=10)

    def loss_of(p):
        return transfer_objective(lm, lm, source, {"p": p}, task, public, config)["p"]

    from engramlab.prompt.soft import initial_prompt

    assert loss_of(source.embeddings) == pytest.approx(0, abs=1e-6)
    moved = transfer(lm, lm, source, task, public, config)
    assert loss_of(moved.embeddings) < 0.5 * loss_of(initial_prompt(lm, 4, 0))
    # the objective is the transfer loss over every public text, read in the task's template
    texts = [task.template.format(t) for t in public]
    with torch.no_grad():
        by_hand = transfer_loss(last_logits(lm, source.embeddings, texts),
                                last_logits(lm, None, texts),
                                last_logits(lm, moved.embeddings, texts),
                                last_logits(lm, None, texts))
    assert loss_of(moved.embeddings) == pytest.approx(float(by_hand), rel=1e-5)
    with pytest.raises(InputError, match="different vocabularies"):
        other_vocab = make_tiny("gpt2")
        other_vocab.tokenizer = type(lm.tokenizer)(tokenizer_object=lm.tokenizer._tokenizer,
                                                   unk_token="[UNK]", pad_token="[PAD]")
        other_vocab.tokenizer.add_tokens(["brand-new"])
        transfer(lm, other_vocab, source, task, public, config)


def test_a_transfer_can_start_from_the_small_prompt_and_keeps_a_private_prompts_last_step():
    lm = make_tiny("llama")
    with torch.no_grad():
        lm.layout.unembed.weight.mul_(20)
    task = _task()
    source = SoftPrompt(torch.randn(4, lm.d_model) * 0.05, {"task": "toy"})
    public = [" ".join(f"w{(5 * i + j) % 40 + 5}" for j in range(4)) for i in range(16)]

    def first_loss(init: str) -> float:
        seen: list[float] = []
        config = TransferConfig(steps=1, lr=0.01, batch_size=8, eval_every=1, init=init)
        transfer(lm, lm, source, task, public, config,
                 on_step=lambda e: seen.append(e["loss"]) if "loss" in e else None)
        return seen[0]

    # between a model and itself the small prompt is where the transfer loss is zero
    assert first_loss("source") < 1e-4
    assert first_loss("random") > 1e-2
    with pytest.raises(InputError, match="'random' or 'source'"):
        transfer(lm, lm, source, task, public, TransferConfig(init="copy"))

    private = SoftPrompt(source.embeddings, {"task": "toy", "dp": {"epsilon": 8.0}})
    config = TransferConfig(steps=6, lr=0.05, batch_size=8, eval_every=1)
    moved = transfer(lm, lm, private, task, public, config)
    assert moved.meta["chosen_step"] == 6
    assert moved.meta["selection"] == "last step (DP source)"
    assert transfer(lm, lm, source, task, public, config).meta["selection"] == (
        "best validation accuracy")
