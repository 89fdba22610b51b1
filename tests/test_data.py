from __future__ import annotations

import json

import pytest
import torch

from engramlab.data import (
    EditCase,
    EditRequest,
    TextCorpus,
    bundled_cases,
    load_cases,
    sample_corpus,
    save_cases,
)
from engramlab.errors import RequestError
from tests.conftest import make_tiny, tiny_text

NESTED = {
    "case_id": 7,
    "requested_rewrite": {"prompt": "The mother tongue of {} is", "subject": "Danielle Darrieux",
                          "target_new": {"str": "English"}, "target_true": {"str": "French"},
                          "relation_id": "P103"},
    "paraphrase_prompts": ["Danielle Darrieux spoke"],
    "neighborhood_prompts": ["The mother tongue of Léon Blum is"],
    "generation_prompts": ["Danielle Darrieux's mother tongue is"],
}
ZSRE = {"subject": "Watts Humphrey", "src": "What university did Watts Humphrey attend?",
        "alt": "University of Michigan", "answers": ["Illinois Institute of Technology"],
        "rephrase": "What university did Watts Humphrey take part in?",
        "loc": "nq question: who played desmond doss father in hacksaw ridge",
        "loc_ans": "Hugo Weaving"}


def _write(tmp_path, records, name="f.json"):
    path = tmp_path / name
    path.write_text(json.dumps(records))
    return path


def test_nested_counterfact_record(tmp_path):
    (case,) = load_cases(_write(tmp_path, [NESTED]))
    assert case.request.text == "The mother tongue of Danielle Darrieux is"
    assert (case.request.target_new, case.request.target_true) == ("English", "French")
    assert case.neighborhood_targets() == ["French"]
    assert case.request.relation_id == "P103"


def test_zsre_record_keeps_its_locality_answer(tmp_path):
    (case,) = load_cases(_write(tmp_path, [ZSRE]))
    assert case.request.prompt == "What university did {} attend?"
    assert case.request.target_true == "Illinois Institute of Technology"
    assert case.neighborhood_targets() == ["Hugo Weaving"]


def test_shared_flat_counterfact_val_loads_every_case(shared_data):
    cases = load_cases(shared_data / "counterfact" / "counterfact-val.json")
    assert len(cases) == 1919
    for c in cases:
        assert c.request.subject in c.request.text
        assert len(c.paraphrase_prompts) == 1 and len(c.neighborhood_prompts) == 1
    first = cases[0]
    assert first.request.prompt == "{}, by" and first.request.target_new == "Sega"


def test_jsonl_round_trip(tmp_path):
    cases = load_cases(_write(tmp_path, [NESTED, ZSRE]))
    path = save_cases(cases, tmp_path / "cases.jsonl")
    assert load_cases(path) == cases


@pytest.mark.parametrize(("kwargs", "match"), [
    ({"prompt": "no placeholder", "subject": "X", "target_new": "Y"}, "placeholder"),
    ({"prompt": "{} is", "subject": "X", "target_new": "  "}, "empty target_new"),
    ({"prompt": "{} is", "subject": "", "target_new": "Y"}, "empty subject"),
])
def test_invalid_requests_are_clear_errors(kwargs, match):
    with pytest.raises(RequestError, match=match):
        EditRequest(**kwargs)


def test_subject_missing_from_prompt_names_both(tmp_path):
    bad = {**ZSRE, "subject": "The Eifel Tower", "case_id": 12}
    with pytest.raises(RequestError) as err:
        load_cases(_write(tmp_path, [bad]))
    assert "The Eifel Tower" in str(err.value) and "case 12" in str(err.value)


def test_unrecognised_format_says_what_is_expected(tmp_path):
    with pytest.raises(RequestError, match="CounterFact"):
        load_cases(_write(tmp_path, [{"question": "?"}]))


def test_bundled_set_is_large_and_complete():
    cases = bundled_cases()
    assert len(cases) >= 60
    assert len({c.case_id for c in cases}) == len(cases)
    for c in cases:
        assert isinstance(c, EditCase)
        assert c.paraphrase_prompts and c.neighborhood_prompts and c.generation_prompts
        assert c.request.target_new != c.request.target_true


@pytest.mark.embedded
def test_embedded_model_answers_the_bundled_facts(smol):
    cases = bundled_cases()
    logits = smol.next_token_logits([c.request.text for c in cases])
    first = [smol.encode(" " + c.request.target_true)[0] for c in cases]
    correct = sum(int(row.argmax()) == t for row, t in zip(logits, first, strict=True))
    assert correct == len(cases)

    def score(prompts_of, answer_of):
        prompts, good, bad = [], [], []
        for c in cases:
            for p, a in zip(prompts_of(c), answer_of(c), strict=True):
                prompts.append(p)
                good.append(smol.encode(" " + a)[0])
                bad.append(smol.encode(" " + c.request.target_new)[0])
        lg = smol.next_token_logits(prompts)
        return sum(float(r[g] > r[b]) for r, g, b in zip(lg, good, bad, strict=True)) / len(lg)

    para = score(lambda c: c.paraphrase_prompts,
                 lambda c: [c.request.target_true] * len(c.paraphrase_prompts))
    neigh = score(lambda c: c.neighborhood_prompts, lambda c: c.neighborhood_targets())
    assert para >= 0.95 and neigh >= 0.95


def test_text_corpus_from_files_packs_rows(tmp_path):
    (tmp_path / "a.txt").write_text("w1 w2 w3\n\nw4 w5")
    (tmp_path / "b.jsonl").write_text(json.dumps({"text": "w6 w7 w8 w9"}) + "\n")
    corpus = TextCorpus.from_path(tmp_path)
    assert corpus.documents == ["w1 w2 w3", "w4 w5", "w6 w7 w8 w9"]
    lm = make_tiny("llama")
    rows = corpus.token_rows(lm, seq_len=4)
    assert rows.shape == (3, 4)  # 9 words + 3 EOS = 12 tokens
    assert rows[0, 3].item() == lm.tokenizer.eos_token_id
    batches = list(corpus.batches(lm, n_tokens=8, batch_size=1, seq_len=4))
    assert len(batches) == 2
    # streamed batches are exactly the packed rows, whatever the batch size and budget
    many = TextCorpus([" ".join(f"w{i + j}" for j in range(i % 7 + 1)) for i in range(150)])
    for n_tokens, batch_size, seq_len in [(40, 3, 4), (37, 2, 5), (10_000, 4, 8), (8, 8, 4)]:
        wanted = -(-n_tokens // seq_len)
        rows = many.token_rows(lm, seq_len=seq_len, max_tokens=wanted * seq_len)
        got = torch.cat(list(many.batches(lm, n_tokens=n_tokens, batch_size=batch_size,
                                          seq_len=seq_len)))
        assert torch.equal(got, rows[:wanted])
    with pytest.raises(ValueError, match="fewer than one row"):
        list(TextCorpus(["w1"]).batches(lm, n_tokens=8, seq_len=4))
    other = TextCorpus(["w1 w2 w3", "w4 w5", "w6 w7 w8 w0"])
    assert other.fingerprint() != corpus.fingerprint()


def test_sampled_corpus_is_seeded_and_cached(isolated_cache):
    lm = make_tiny("gpt2")
    torch.manual_seed(123)
    expected_next = torch.rand(1)
    torch.manual_seed(123)
    a = sample_corpus(lm, n_tokens=64, doc_tokens=16, batch_size=2, seed=3, progress=False,
                      starters=["w1", "w2 w3"])
    assert torch.equal(torch.rand(1), expected_next), "the caller's RNG must be untouched"
    files = list((isolated_cache / "corpora").iterdir())
    assert len(files) == 1
    b = sample_corpus(lm, n_tokens=64, doc_tokens=16, batch_size=2, seed=3, progress=False,
                      starters=["w1", "w2 w3"])
    assert a.documents == b.documents and len(a.documents) == 4
    files[0].write_text("{not json")
    c = sample_corpus(lm, n_tokens=64, doc_tokens=16, batch_size=2, seed=3, progress=False,
                      starters=["w1", "w2 w3"])
    assert c.documents == a.documents


def test_wiki_corpus_is_real_encyclopaedic_text_in_a_hashed_order():
    from engramlab.data import wiki_corpus

    corpus = wiki_corpus()
    docs = corpus.documents
    assert len(docs) > 10_000 and sum(map(len, docs)) > 4_500_000
    assert corpus.eval_start is not None and corpus.name == "wiki"
    # not alphabetical: the first hundred documents start with many different letters
    assert len({d[0].upper() for d in docs[:100]}) > 10
    assert any("Albert Einstein" in d for d in docs) and "<|im_end|>" not in "".join(docs)
    assert wiki_corpus().fingerprint() == corpus.fingerprint()


def test_corpus_names_are_checked_before_any_work(tmp_path, monkeypatch):
    from engramlab.data import get_corpus
    from engramlab.data.corpus import check_corpus_spec
    from engramlab.errors import SettingsError

    with pytest.raises(SettingsError, match="neither 'wiki' nor 'sampled'"):
        check_corpus_spec("wikipedia")
    lm = make_tiny("gpt2")
    monkeypatch.setattr(lm.model, "generate", None)  # 'wiki' and a path must not sample
    (tmp_path / "mine.txt").write_text("w1 w2\n\nw3 w4 w5")
    assert get_corpus(lm, str(tmp_path / "mine.txt")).documents == ["w1 w2", "w3 w4 w5"]
    assert get_corpus(lm).name == "wiki" == get_corpus(lm, "wiki").name


def test_edit_settings_refuse_an_unknown_statistics_corpus():
    from engramlab.edit.base import EditHParams
    from engramlab.errors import SettingsError

    with pytest.raises(SettingsError, match=r"corpus 'nowhere\.txt'"):
        EditHParams().replace(**{"stats.corpus": "nowhere.txt"})
    assert EditHParams().replace(stats={"corpus": "sampled"}).stats.corpus == "sampled"


@pytest.mark.embedded
def test_wiki_corpus_holds_a_million_tokens_for_the_embedded_model(smol):
    from engramlab.data import wiki_corpus

    corpus = wiki_corpus()
    n = sum(len(ids) for ids in smol.tokenizer(corpus.documents,
                                               add_special_tokens=False)["input_ids"])
    assert n >= 1_000_000
    assert n - corpus.eval_start >= 100_000  # the evaluation part


def test_corpus_head_keeps_whole_documents_until_the_token_count_is_reached():
    lm = make_tiny("llama")
    docs = [tiny_text(5, seed=s) for s in range(10)]
    corpus = TextCorpus(docs, name="t")
    lengths = [len(lm.tokenizer(d, add_special_tokens=False)["input_ids"]) + 1 for d in docs]
    head = corpus.head(lm, lengths[0] + lengths[1] + 1)  # reached inside the third document
    assert head.documents == docs[:3]
    assert corpus.head(lm, 1).documents == docs[:1]
    assert corpus.head(lm, 10**6).documents == docs
