"""Fine-tuning as a WeightDelta: what trains, what comes back, and that PEFT agrees."""

from __future__ import annotations

import dataclasses

import pytest
import torch
import torch.nn.functional as F

from engramlab.adapt import FinetuneConfig, finetune, trainable_names
from engramlab.data.corpus import TextCorpus
from engramlab.errors import RequestError
from tests.conftest import make_tiny, tiny_facts_file, tiny_text


def _corpus() -> TextCorpus:
    return TextCorpus([tiny_text(40, seed=s) for s in range(8)], name="tiny")


def _loss(lm, rows) -> float:
    with torch.no_grad():
        logits = lm.model(input_ids=rows).logits
    return float(F.cross_entropy(logits[:, :-1].flatten(0, 1), rows[:, 1:].flatten()))


def _weights(lm):
    return {n: p.detach().clone() for n, p in lm.model.named_parameters()}


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_full_finetune_returns_its_change_and_leaves_the_model_as_it_was(family):
    lm = make_tiny(family)
    corpus = _corpus()
    rows = corpus.token_rows(lm, seq_len=16)
    before, loss0 = _weights(lm), _loss(lm, rows)
    cfg = FinetuneConfig(steps=8, lr=3e-3, batch_size=4, seq_len=16)
    result = finetune(lm, corpus, cfg)
    assert all(torch.equal(p, before[n]) for n, p in lm.model.named_parameters())
    assert not lm.model.training
    assert result.losses[-1] < result.losses[0]
    with result.delta.applied(lm):
        assert _loss(lm, rows) < loss0 - 0.05  # the delta is the training
    again = finetune(lm, corpus, cfg)  # seeded: the same change
    for name, entry in result.delta.entries.items():
        assert torch.allclose(entry.to_dense(), again.delta.entries[name].to_dense(), atol=1e-6)


def test_restricted_modes_train_only_their_parameters():
    lm = make_tiny("llama")
    edited = [lm.layout.value_param_name(1)]
    names = [n for n, _ in lm.model.named_parameters()]
    assert trainable_names(lm, "edited", edited) == edited
    assert set(trainable_names(lm, "non-edited", edited)) == set(names) - set(edited)
    cfg = FinetuneConfig(mode="edited", steps=3, lr=1e-2, batch_size=2, seq_len=16)
    only = finetune(lm, _corpus(), cfg, edited=edited).delta
    assert list(only.entries) == edited
    assert float(only.entries[edited[0]].to_dense().abs().max()) > 0
    rest = finetune(lm, _corpus(), FinetuneConfig(mode="non-edited", steps=3, lr=1e-2,
                                                   batch_size=2, seq_len=16),
                    edited=edited).delta
    assert edited[0] not in rest.entries
    with pytest.raises(RequestError, match="needs the edit"):
        trainable_names(lm, "edited")
    with pytest.raises(RequestError, match="unknown fine-tuning mode"):
        FinetuneConfig(mode="qlora")


@pytest.mark.parametrize(("family", "mode"), [("llama", "lora"), ("gpt2", "lora"),
                                               ("llama", "dora")])
def test_adapter_delta_matches_the_adapter_peft_loads_back(family, mode, tmp_path):
    from peft import PeftModel

    lm = make_tiny(family)
    corpus = _corpus()
    rows = corpus.token_rows(lm, seq_len=16)
    before = _weights(lm)
    cfg = FinetuneConfig(mode=mode, steps=6, lr=5e-3, batch_size=4, seq_len=16, rank=4)
    result = finetune(lm, corpus, cfg, adapter_out=tmp_path / "adapter")
    assert all(torch.equal(p, before[n]) for n, p in lm.model.named_parameters())
    assert not lm.model.training  # dropout stays off, as before the fine-tune
    assert (tmp_path / "adapter" / "adapter_config.json").is_file()
    if mode == "lora":
        assert all(e.is_low_rank and e.u.shape[1] == 4 for e in result.delta.entries.values())
    with result.delta.applied(lm), torch.no_grad():
        ours = lm.model(input_ids=rows).logits
    base = make_tiny(family)  # the same weights, wrapped by peft from the saved folder
    with torch.no_grad():
        theirs = PeftModel.from_pretrained(base.model, str(tmp_path / "adapter"))(
            input_ids=rows).logits
        plain = lm.model(input_ids=rows).logits
    assert not torch.allclose(ours, plain, atol=1e-4)  # the adapter did something
    assert torch.allclose(ours, theirs, atol=1e-4)
    if mode == "lora":  # the saved folder read back as a delta: the same change
        from engramlab.adapt import load_adapter

        loaded = load_adapter(tmp_path / "adapter", lm)
        assert loaded.entries.keys() == result.delta.entries.keys()
        for name, entry in result.delta.entries.items():
            assert torch.allclose(loaded.entries[name].to_dense(), entry.to_dense(), atol=1e-6)


# survival ------------------------------------------------------------------------------------
def test_overlap_is_the_share_of_the_update_in_the_edits_column_and_row_spaces():
    from engramlab import ParamDelta, WeightDelta
    from engramlab.adapt import overlap

    g = torch.Generator().manual_seed(0)
    u, v = torch.randn(6, 2, generator=g), torch.randn(5, 2, generator=g)
    q_u, _ = torch.linalg.qr(torch.cat([u, torch.randn(6, 4, generator=g)], 1))
    inside, outside = q_u[:, :2] @ torch.randn(2, 5, generator=g), \
        q_u[:, 2:] @ torch.randn(4, 5, generator=g)
    edit = WeightDelta({"w": ParamDelta(u=u, v=v)})
    update = WeightDelta({"w": ParamDelta(dense=inside + outside)})
    (row,) = overlap(edit, update)
    energy = lambda t: float((t.double() ** 2).sum())  # noqa: E731
    assert row["column_space"] == pytest.approx(energy(inside) / energy(inside + outside),
                                                rel=1e-5)
    q_v, _ = torch.linalg.qr(v.double())
    f = (inside + outside).double()
    assert row["row_space"] == pytest.approx(energy(f @ q_v) / energy(f), rel=1e-5)
    assert overlap(edit, WeightDelta({}))[0]["column_space"] == 0.0


def test_survive_edits_finetunes_and_counts_the_edits_that_still_work(isolated_cache):
    from engramlab.adapt import downstream_accuracy, fact_rows, survive
    from engramlab.data import EditCase, EditRequest
    from engramlab.edit import MEMIT
    from engramlab.evaluate import case_scores

    lm = make_tiny("llama")
    before = _weights(lm)
    cases = [EditCase(EditRequest(f"w1 {{}} w2 w{3 + i}", f"w{5 + i}", f"w{40 + i}",
                                  f"w{60 + i}"), paraphrase_prompts=(f"w9 w{5 + i} w2",))
             for i in range(3)]
    facts = [EditCase(EditRequest("w1 {} w2", f"w{20 + i}", " w70", " w71")) for i in range(4)]
    # a random tiny model barely listens to one layer: a free, unclamped target
    settings = {"layers": [0, 1], "templates": [], "mom2_weight": 1e-3,
                "target": {"steps": 20, "clamp": 50.0, "weight_decay": 0.0, "lr": 1.0,
                           "kl_factor": 0.0}, "stats": {"tokens": 2048, "seq_len": 32}}
    editor = MEMIT(**settings)
    cfg = FinetuneConfig(mode="edited", steps=4, lr=5e-2, batch_size=2, seq_len=16)
    result = survive(lm, editor, cases, _corpus(), cfg, downstream=fact_rows(facts))
    assert all(torch.equal(p, before[n]) for n, p in lm.model.named_parameters())
    # recomputed by hand: the same edit and fine-tune, the successes before and after
    edit = MEMIT(**settings).edit(lm, [c.request for c in cases])
    with edit.applied(lm):
        ok = [s.efficacy[0] for s in case_scores(lm, cases)]
        known = downstream_accuracy(lm, fact_rows(facts))
        tuned = finetune(lm, _corpus(), cfg, edited=edit)
        with tuned.delta.applied(lm):
            still = [s.efficacy[0] for s in case_scores(lm, cases)]
            later = downstream_accuracy(lm, fact_rows(facts))
    kept = [b for a, b in zip(ok, still, strict=True) if a]
    assert kept  # some edits worked, so survival is a share of something
    assert result.survival["efficacy"] == pytest.approx(sum(kept) / len(kept))
    assert [r["parameter"] for r in result.overlap] == list(edit.entries)
    assert all(0 <= r["column_space"] <= 1 + 1e-9 for r in result.overlap)
    assert result.downstream == {"before": known, "after": later}
    assert set(result.to_json()) == {"edit", "after_finetune", "survival", "downstream",
                                     "overlap"}


def test_survive_command_prints_the_specified_json(tmp_path, capsys, isolated_cache):
    import json

    from engramlab.cli import main

    folder = make_tiny("llama").save(tmp_path / "tiny")
    facts = tiny_facts_file(tmp_path / "facts.jsonl", 4)
    text = tmp_path / "text.txt"
    text.write_text(" ".join(tiny_text(400, seed=s) for s in range(3)))
    args = ["survive", "--model", str(folder), "--facts", str(facts), "--limit", "2",
            "--edit-method", "alphaedit", "--finetune", "lora", "--data", str(text),
            "--steps", "2", "--seq-len", "16", "--batch-size", "2", "--rank", "2", "--json",
            "--set", "stats.tokens=1024", "stats.seq_len=32", "target.steps=2",
            "--out", str(tmp_path / "run")]
    assert main(args) == 0
    out = json.loads(capsys.readouterr().out)
    for key in ("edit", "after_finetune", "survival", "downstream", "overlap"):
        assert key in out
    assert set(out["survival"]) == {"efficacy", "paraphrase"}
    assert (out["n_edited"], out["n_downstream"]) == (2, 2)
    assert json.loads((tmp_path / "run" / "result.json").read_text())["survival"] == \
        out["survival"]
    with pytest.raises(SystemExit) as bad:
        main(["survive", "--finetune", "qlora"])
    assert bad.value.code == 2
    # a task: trained on its completions, scored on its test part
    task = tmp_path / "task.jsonl"
    task.write_text("\n".join(json.dumps({"prompt": f"w1 w{i} w2", "completion": f"w{30 + i}"})
                              for i in range(3, 23)))
    assert main([*args[:args.index("--data")], "--data", str(task),
                 *args[args.index("--data") + 2:-2]]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["data"] == "task" and out["n_downstream"] == 4  # a fifth of 20 prompts
    assert out["downstream"]["before"] is not None
    # nothing to train on: one line, exit 2, before the model loads
    bad_task = tmp_path / "bad.jsonl"
    bad_task.write_text('{"prompt": "w1", "completion": " "}\n')
    assert main(["survive", "--model", str(tmp_path / "missing"), "--data", str(bad_task)]) == 2
    err = capsys.readouterr().err.strip()
    assert "no usable rows" in err and len(err.splitlines()) == 1


def test_task_rows_train_the_completion_and_never_the_prompt():
    from engramlab.adapt import training_rows
    from engramlab.adapt.finetune import IGNORE
    from engramlab.data.tasks import TaskRow

    lm = make_tiny("llama")
    rows = [TaskRow("w1 w2 w3", "w4 w5"), TaskRow("w6", "w7")]
    ids, targets = training_rows(lm, rows, FinetuneConfig(seq_len=16))
    eos = lm.tokenizer.eos_token_id
    assert ids[0, :6].tolist() == [*lm.encode("w1 w2 w3 w4 w5"), eos]
    trained = [(targets[r] != IGNORE).nonzero().flatten().tolist() for r in range(2)]
    assert trained == [[3, 4, 5], [1, 2]]  # completion and end of text only
    assert torch.equal(targets[0, 3:6], ids[0, 3:6])
    cfg = FinetuneConfig(steps=6, lr=1e-2, batch_size=2, seq_len=16)
    delta = finetune(lm, rows, cfg).delta

    def logp(prompt: str, word: str) -> float:
        row = torch.tensor([lm.encode(f"{prompt} {word}")])
        with torch.no_grad():
            out = torch.log_softmax(lm.model(input_ids=row).logits[0, -2], -1)
        return float(out[row[0, -1]])

    before = logp("w1 w2 w3", "w4"), logp("w1 w2", "w3")
    with delta.applied(lm):
        after = logp("w1 w2 w3", "w4"), logp("w1 w2", "w3")
    assert after[0] > before[0] + 0.5  # the completion is learnt
    assert after[1] < before[1] + 0.5 * (after[0] - before[0])  # the prompt far less, if at all


def test_an_interrupted_finetune_resumes_from_its_checkpoint(tmp_path, monkeypatch):
    import importlib

    from engramlab.errors import InputError

    ft_module = importlib.import_module("engramlab.adapt.finetune")  # the module, not the function

    lm = make_tiny("llama")
    cfg = FinetuneConfig(steps=6, lr=3e-3, batch_size=2, seq_len=16, save_every=2)
    whole = finetune(lm, _corpus(), cfg)
    path = tmp_path / "ft.pt"
    save = ft_module._Checkpoint.save

    def save_then_stop(self, step, *args):
        save(self, step, *args)
        if step == 4:
            raise KeyboardInterrupt

    monkeypatch.setattr(ft_module._Checkpoint, "save", save_then_stop)
    with pytest.raises(KeyboardInterrupt):
        finetune(lm, _corpus(), cfg, checkpoint=path)
    assert path.is_file()
    monkeypatch.setattr(ft_module._Checkpoint, "save", save)
    with pytest.raises(InputError, match="another fine-tune"):
        finetune(lm, _corpus(), FinetuneConfig(steps=6, lr=1e-3, batch_size=2, seq_len=16),
                 checkpoint=path)
    resumed = finetune(lm, _corpus(), cfg, checkpoint=path)
    assert not path.exists()  # complete: nothing left to resume
    assert resumed.losses == pytest.approx(whole.losses, abs=1e-6)
    for name, entry in whole.delta.entries.items():
        assert torch.allclose(entry.to_dense(), resumed.delta.entries[name].to_dense(),
                              atol=1e-6)
    path.write_bytes(b"not a checkpoint")
    with pytest.raises(InputError, match="cannot be read"):
        finetune(lm, _corpus(), cfg, checkpoint=path)


def test_bfloat16_finetune_trains_under_autocast_and_returns_float32():
    lm = make_tiny("llama")
    base = dict(steps=8, lr=3e-3, batch_size=4, seq_len=16)
    rows = _corpus().token_rows(lm, seq_len=16)
    full = finetune(lm, _corpus(), FinetuneConfig(**base)).delta
    half = finetune(lm, _corpus(), FinetuneConfig(**base, precision="bfloat16"))
    loss0 = _loss(lm, rows)
    with half.delta.applied(lm):
        assert _loss(lm, rows) < loss0 - 0.05  # it trains
    name = next(iter(full.entries))
    mixed = half.delta.entries[name].to_dense()
    assert mixed.dtype == torch.float32
    assert not torch.equal(mixed, full.entries[name].to_dense())  # bfloat16 arithmetic ran
    cos = F.cosine_similarity(mixed.flatten(), full.entries[name].to_dense().flatten(), dim=0)
    assert cos > 0.9  # the same training, rounded
    with pytest.raises(RequestError, match="precision"):
        FinetuneConfig(precision="float8")


def _pararel(root, triples: dict[str, list[tuple[str, str]]]):
    import json

    (root / "patterns").mkdir(parents=True)
    (root / "trex").mkdir()
    for rel, pairs in triples.items():
        (root / "patterns" / f"{rel}.jsonl").write_text(
            json.dumps({"pattern": f"[X] {rel.lower()} [Y]."}) + "\n")
        (root / "trex" / f"{rel}.jsonl").write_text("".join(
            json.dumps({"sub_label": s, "obj_label": o}) + "\n" for s, o in pairs))
    return root


def test_trex_questions_split_by_subject_and_leave_out_edited_and_ambiguous_facts(tmp_path):
    from engramlab.data.tasks import is_task, load_task

    subjects = [f"S{i}" for i in range(20)]
    root = _pararel(tmp_path / "pararel", {
        "P1": [(s, f"A{i % 3}") for i, s in enumerate(subjects)],
        "P2": [(s, f"B{i % 2}") for i, s in enumerate(subjects)] + [("S0", "B9")]})
    assert is_task(root)
    task = load_task(root, exclude_subjects={"S5"}, test_share=0.25, seed=1)
    def subject(r):
        return r.prompt.split()[0]
    train, test = {subject(r) for r in task.train}, {subject(r) for r in task.test}
    assert train and test and not train & test
    assert "S5" not in train | test
    # S0 has two objects under P2: that question is left out, its P1 question kept
    assert [r for r in task.train + task.test if r.prompt == "S0 p2"] == []
    assert any(r.prompt == "S0 p1" for r in task.train + task.test)
    assert len(task.train) + len(task.test) == 2 * 19 - 1
    assert load_task(root, seed=1).test != load_task(root, seed=2).test


def test_task_files_with_nothing_to_train_on_are_refused(tmp_path):
    from engramlab.data.tasks import is_task, load_task
    from engramlab.errors import InputError

    text = tmp_path / "text.jsonl"
    text.write_text('{"text": "a b c"}\n')
    assert not is_task(text)  # a text corpus, not a task
    empty = tmp_path / "empty.jsonl"
    empty.write_text('{"prompt": "a", "completion": ""}\n')
    assert is_task(empty)
    with pytest.raises(InputError, match="no usable rows"):
        load_task(empty)
    latin = tmp_path / "latin.jsonl"
    latin.write_bytes('{"prompt": "caf\u00e9", "completion": "x"}\n'.encode("latin-1"))
    with pytest.raises(InputError, match="UTF-8"):
        load_task(latin)


def test_zero_steps_change_nothing_and_a_zero_lora_is_bit_identical():
    lm = make_tiny("llama")
    before = _weights(lm)
    for mode in ("full", "lora"):
        result = finetune(lm, _corpus(), FinetuneConfig(mode=mode, steps=0, seq_len=16,
                                                        batch_size=2, rank=2))
        assert result.losses == []
        assert all(float(e.to_dense().abs().max()) == 0 for e in result.delta.entries.values())
        assert all(torch.equal(p, before[n]) for n, p in lm.model.named_parameters())
    with pytest.raises(RequestError, match="0 or more"):
        FinetuneConfig(steps=-1)


def test_survival_is_one_without_a_change_and_zero_when_the_finetune_reverts_the_edit(
        monkeypatch, isolated_cache):
    import importlib

    from engramlab.adapt import FinetuneResult, survive
    from engramlab.data import EditCase, EditRequest
    from engramlab.delta import WeightDelta
    from engramlab.edit import ROME
    from tests.test_serve import TINY_ROME

    module = importlib.import_module("engramlab.adapt.survive")
    lm = make_tiny("llama")
    cases = [EditCase(EditRequest("w1 {} w2", s, t, "w60")) for s, t in (("w5", "w40"),
                                                                        ("w7", "w41"))]
    editor = ROME(**TINY_ROME)
    edit = editor.edit(lm, [c.request for c in cases])
    still = survive(lm, editor, cases, _corpus(), FinetuneConfig(steps=0, seq_len=16),
                    edit=edit)
    assert still.survival["efficacy"] == 1.0
    # a "fine-tune" that is exactly the edit undone: every edit that worked stops working
    def undo(model, *_a, **_k):  # made on the edited model, as a real fine-tune's delta is
        return FinetuneResult(WeightDelta.for_model(model, edit.scaled(-1.0).entries))

    monkeypatch.setattr(module, "finetune", undo)
    undone = survive(lm, editor, cases, _corpus(), FinetuneConfig(), edit=edit)
    assert undone.edit["efficacy"] > 0 and undone.survival["efficacy"] == 0.0
    assert undone.overlap[0]["column_space"] == pytest.approx(1.0)
    # the edited model's scores, measured once for several fine-tunes, are the ones it uses
    scored = module.score_edited(lm, edit, cases)
    again = survive(lm, editor, cases, _corpus(), FinetuneConfig(), edit=edit,
                    edited_scores=scored)
    assert again.edit == undone.edit and again.survival == undone.survival
    nothing_worked = module.EditedScores([dataclasses.replace(c, efficacy=[False] * len(
        c.efficacy)) for c in scored.cases], None)
    assert survive(lm, editor, cases, _corpus(), FinetuneConfig(), edit=edit,
                   edited_scores=nothing_worked).survival["efficacy"] is None


def test_a_short_lora_run_lowers_the_margin_of_an_edit_on_the_embedded_model(smol):
    from engramlab.batching import target_ids
    from engramlab.data.bundled import bundled_cases
    from engramlab.data.corpus import wiki_corpus
    from engramlab.edit import MEMIT

    cases = bundled_cases()[:5]
    edit = MEMIT().edit(smol, [c.request for c in cases])

    def margins() -> list[float]:
        out = []
        for c in cases:
            text = c.request.text
            with torch.no_grad():
                logits = smol.model(**smol.tokenize(text)).logits[0, -1].float()
            lp = torch.log_softmax(logits, -1)
            new, true = (target_ids(smol, text, t)[0] for t in (c.request.target_new,
                                                                 c.request.target_true))
            out.append(float(lp[new] - lp[true]))
        return out

    with edit.applied(smol):
        before = margins()
        tuned = finetune(smol, wiki_corpus(), FinetuneConfig(mode="lora", steps=5, lr=1e-3,
                                                             batch_size=2, seq_len=64))
        with tuned.delta.applied(smol):
            after = margins()
    assert all(m > 0 for m in before)  # the edits took
    assert any(a < b for a, b in zip(after, before, strict=True)), (before, after)


def test_an_adapter_for_another_model_or_no_adapter_is_refused(tmp_path):
    from engramlab.adapt import load_adapter
    from engramlab.errors import InputError

    lm = make_tiny("llama")
    finetune(lm, _corpus(), FinetuneConfig(mode="lora", steps=1, seq_len=16, batch_size=2,
                                           rank=2), adapter_out=tmp_path / "llama")
    with pytest.raises(InputError, match="another model"):
        load_adapter(tmp_path / "llama", make_tiny("gpt2"))
    # engram apply takes the adapter folder too; another model's adapter is one line, exit 2
    from engramlab.cli import main

    gpt2 = make_tiny("gpt2").save(tmp_path / "gpt2")
    assert main(["apply", "--model", str(gpt2), "--delta", str(tmp_path / "llama"),
                 "--out", str(tmp_path / "merged")]) == 2
    assert not (tmp_path / "merged").exists()
    src = lm.save(tmp_path / "src")
    assert main(["apply", "--model", str(src), "--delta", str(tmp_path / "llama"),
                 "--out", str(tmp_path / "merged")]) == 0
    from engramlab.models import load_model

    # the merged folder loads back with the adapter's change in its weights
    back = load_model(str(tmp_path / "merged"), device="cpu", progress=False)
    change = load_adapter(tmp_path / "llama", lm)
    name = next(iter(change.entries))
    assert torch.allclose(dict(back.model.named_parameters())[name] -
                          dict(lm.model.named_parameters())[name],
                          change.entries[name].to_dense(), atol=1e-6)
    with pytest.raises(InputError, match="not a saved PEFT adapter"):
        load_adapter(tmp_path, lm)
    finetune(lm, _corpus(), FinetuneConfig(mode="dora", steps=1, seq_len=16, batch_size=2,
                                           rank=2), adapter_out=tmp_path / "dora")
    with pytest.raises(InputError, match="not a plain LoRA"):
        load_adapter(tmp_path / "dora", lm)
