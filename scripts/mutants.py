"""Do the tests catch wrong maths? Run the fast suite against deliberately broken methods.

Each mutant is one textual change to one source file that breaks a method the way a plausible
bug would (a random target, a missing projection, the wrong loss). For each, a copy of ``src``
with that change is put first on ``PYTHONPATH`` and ``pytest -m "not embedded"`` runs on it; a
mutant is *caught* when at least one test fails. The unmutated copy runs first and must pass.
Prints one JSON object (per mutant: caught, the failing tests, seconds); exit status 1 when any
mutant survives.

    .venv/bin/python scripts/mutants.py [--only NAME ...] [--tests tests/test_edit.py ...]
"""

from __future__ import annotations

import argparse
import json
import os
import re
import shutil
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


@dataclass(frozen=True)
class Mutant:
    name: str
    file: str  # relative to src/engramlab
    old: str
    new: str


MUTANTS = (
    Mutant("rome_random_value", "edit/rome.py",
           "rome_update(keys[i], targets.delta[i], cov_k=cov_k[:, i])",
           "rome_update(keys[i], torch.randn_like(targets.delta[i]), cov_k=cov_k[:, i])"),
    Mutant("memit_random_residuals", "edit/memit.py",
           "resid = (z - current) / (len(layers) - i)",
           "resid = torch.randn_like(z - current)"),
    Mutant("alphaedit_without_projection", "edit/alphaedit.py",
           "alphaedit_update(keys, resid, state.bases[layer], prev, hp.alpha)",
           "alphaedit_update(keys, resid, torch.eye(keys.shape[0], dtype=torch.float64), None, "
           "hp.alpha)"),
    Mutant("npo_computes_ga_loss", "erase/finetune.py",
           "npo = -(2.0 / self.beta) * torch.nn.functional.logsigmoid(-self.beta * ratio).mean()",
           "npo = -_nll(lm, f_ids, f_mask)"),
    Mutant("rmu_steers_to_zero", "erase/finetune.py",
           'return {"target": self.steering * scale * u,',
           'return {"target": torch.zeros_like(u),'),
    Mutant("logit_lens_without_final_norm", "lens/logit.py",
           "    def translate(self, hidden: torch.Tensor, layer: int) -> torch.Tensor:\n"
           "        return hidden\n",
           "    def translate(self, hidden: torch.Tensor, layer: int) -> torch.Tensor:\n"
           "        return hidden\n\n"
           "    def predict(self, lm, hidden, layer):\n"
           "        return lm.layout.unembed(hidden)\n"),
    Mutant("tuned_lens_trained_on_next_token_ce", "lens/tuned.py",
           "kl = kl_to_final(lm, final_logp, lens.predict(lm, st.hidden[layer][:n], layer))",
           "kl = F.cross_entropy(lens.predict(lm, st.hidden[layer][:n], layer).float(), "
           "st.next_ids[:n].clamp_min(0), reduction='none')"),
    Mutant("tracing_noise_rows_mixed", "inspect/tracing.py",
           "noise.repeat(reps, 1, 1)", "noise.repeat_interleave(reps, 0)"),
    Mutant("tracing_restores_corrupted_state", "inspect/tracing.py",
           "return torch.where(mask[..., None], clean.to(t.dtype).expand_as(t), t)",
           "return t"),
    Mutant("krs_against_the_unlearned_loss", "inspect/unlearning.py",
           "krs[kind].append(1 - float(((patched - original) ** 2).mean()) / base)",
           "krs[kind].append(1 - float(((patched - unlearned) ** 2).mean()) / base)"),
    Mutant("specialisation_without_general_drop", "inspect/specialisation.py",
           '"general_drop": drop_g, "pss": drop_c - drop_g}',
           '"general_drop": drop_g, "pss": drop_c}'),
    Mutant("directions_from_held_out_states", "inspect/reasoning.py",
           'dirs = mean_difference(states["reasoning", "tune"], states["recall", "tune"])',
           'dirs = mean_difference(states["reasoning", "held"], states["recall", "held"])'),
    Mutant("steering_adds_the_unit_direction", "inspect/reasoning.py",
           "return t + alpha * (t @ r).unsqueeze(-1) * r", "return t + alpha * r"),
    Mutant("atlas_top_k_forgets_earlier_batches", "inspect/atlas.py",
           "values = torch.cat([top_act[x], acts])",
           "values = torch.cat([top_act[x] - math.inf, acts])"),
    Mutant("atlas_homogeneity_counts_repeated_tokens", "inspect/atlas.py",
           "differ = ids[..., :, None] != ids[..., None, :]",
           "differ = ~torch.eye(ids.shape[-1], dtype=torch.bool).expand(*ids.shape, -1)"),
    Mutant("deltaedit_never_avoids_the_past_directions", "edit/deltaedit.py",
           "subject_pos=hp.subject_pos, avoid=avoid,", "subject_pos=hp.subject_pos, avoid=None,"),
    Mutant("deltaedit_avoids_the_weakest_directions", "edit/deltaedit.py",
           "vectors[:, values.numel() - keep:].flip(1)", "vectors[:, :keep]"),
    Mutant("deltaedit_forgets_the_past_update", "edit/deltaedit.py",
           "update if past is None else past + update", "update"),
    Mutant("noise_forgets_all_but_the_last_update", "edit/noise.py",
           "self._past = update if self._past is None else self._past + update",
           "self._past = update"),
    Mutant("noise_drops_the_later_updates", "edit/noise.py",
           "later[:first] += response", "later[:first] += 0 * response"),
    Mutant("relation_specificity_rewards_the_new_object", "evaluate/counterfact.py",
           'KEEPING = ("neighborhood", "relation")', 'KEEPING = ("neighborhood",)'),
    Mutant("lora_delta_without_its_scaling", "adapt/finetune.py",
           ' * module.scaling["default"]', ""),
    Mutant("targets_skip_the_edited_block_too", "edit/targets.py",
           "g.prefix.run(lm, start=parse_point(lm, point)[1])",
           "g.prefix.run(lm, start=parse_point(lm, point)[1] + 1)"),
    Mutant("probe_answers_in_length_order", "evaluate/erasure.py",
           "hits[i] = guess",
           "hits[batch[0] + batch.index(i)] = guess"),
    Mutant("scoring_starts_at_the_last_changed_block", "evaluate/erasure.py",
           "else min(b for b in blocks if b is not None)",
           "else max(b for b in blocks if b is not None)"),
    Mutant("entry_states_kept_without_their_block", "evaluate/erasure.py",
           "kept = self._kept.pop(self.block, {})\n        self._kept[self.block] = kept",
           "kept = self._kept.pop(-1, {})\n        self._kept[-1] = kept"),
    Mutant("task_rows_train_the_prompt", "adapt/finetune.py",
           "targets[i, start:len(seq)] = ids[i, start:len(seq)]",
           "targets[i, :len(seq)] = ids[i, :len(seq)]"),
    Mutant("resume_without_the_optimiser_state", "adapt/finetune.py",
           'opt.load_state_dict(state["opt"])', "pass"),
    Mutant("sequential_resume_on_the_unedited_weights", "edit/protocols.py",
           "                    params[name].copy_(value)\n", "                    pass\n"),
    Mutant("sequential_resume_without_the_editor_state", "edit/protocols.py",
           "resumed.batches_done, resumed.total, resumed.state",
           "resumed.batches_done, resumed.total, None"),
    Mutant("prefix_text_at_position_zero", "models/kv.py",
           "pos = width + torch.arange(t, device=attention_mask.device)[None].expand(b, t)",
           "pos = torch.arange(t, device=attention_mask.device)[None].expand(b, t)"),
    Mutant("prefix_keys_and_values_swapped", "prompt/prefix.py",
           "return [(x[2 * i], x[2 * i + 1]) for i in range(lm.n_layers)]",
           "return [(x[2 * i + 1], x[2 * i]) for i in range(lm.n_layers)]"),
    Mutant("private_transfer_picks_its_best_step", "prompt/post.py",
           "on_step, keep_last=private)", "on_step, keep_last=False)"),
    Mutant("survival_rescores_instead_of_the_given_scores", "adapt/survive.py",
           "    if edited_scores is None:\n", "    if True:\n"),
    Mutant("statistics_collected_without_the_lock", "stats.py",
           "with build_lock(lock) if use_cache else nullcontext():", "with nullcontext():"),
    Mutant("gguf_cache_built_without_the_lock", "models/gguf.py",
           "    with build_lock(folder):\n", "    if True:\n"),
)


def run_suite(src: Path, tests: list[str]) -> tuple[bool, list[str], float]:
    """``pytest -m "not embedded"`` with ``src`` first on the path: (passed, failed ids, s)."""
    env = {**os.environ, "PYTHONPATH": f"{src}{os.pathsep}{ROOT}"}
    cmd = [sys.executable, "-m", "pytest", "-q", "-m", "not embedded", "-p", "no:cacheprovider",
           "-o", "addopts=", "--no-header", "-rf", *tests]
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
    failed = sorted(set(re.findall(r"^FAILED (\S+)", proc.stdout, flags=re.M)))
    return proc.returncode == 0, failed, time.perf_counter() - t0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", nargs="*", default=None, help="mutant names (default: all)")
    ap.add_argument("--tests", nargs="*", default=["tests"], help="test paths to run")
    args = ap.parse_args()
    chosen = [m for m in MUTANTS if args.only is None or m.name in args.only]
    unknown = set(args.only or []) - {m.name for m in MUTANTS}
    if unknown:
        print(f"mutants: error: unknown mutant(s) {sorted(unknown)}; known: "
              f"{[m.name for m in MUTANTS]}", file=sys.stderr)
        return 2
    out: dict = {"tests": args.tests, "mutants": []}
    with tempfile.TemporaryDirectory(prefix="engramlab-mutants-") as tmp:
        src = Path(tmp) / "src"
        shutil.copytree(ROOT / "src", src, ignore=shutil.ignore_patterns("*.egg-info"))
        ok, failed, seconds = run_suite(src, args.tests)
        out["baseline"] = {"passed": ok, "failed": failed, "seconds": round(seconds, 1)}
        print(f"baseline: {'passed' if ok else 'FAILED ' + str(failed)} ({seconds:.0f} s)",
              file=sys.stderr, flush=True)
        if not ok:
            print(json.dumps(out, indent=1))
            return 1
        for m in chosen:
            path = src / "engramlab" / m.file
            text = path.read_text()
            if text.count(m.old) != 1:
                raise SystemExit(f"mutant {m.name}: the text to replace occurs "
                                 f"{text.count(m.old)} times in {m.file}; update the mutant")
            path.write_text(text.replace(m.old, m.new))
            try:
                ok, failed, seconds = run_suite(src, args.tests)
            finally:
                path.write_text(text)
            out["mutants"].append({"name": m.name, "file": m.file, "caught": not ok,
                                   "failed_tests": failed, "seconds": round(seconds, 1)})
            verdict = f"caught by {len(failed)} test(s)" if not ok else "SURVIVED"
            print(f"{m.name}: {verdict} ({seconds:.0f} s)", file=sys.stderr, flush=True)
    print(json.dumps(out, indent=1))
    return 0 if all(m["caught"] for m in out["mutants"]) else 1


if __name__ == "__main__":
    sys.exit(main())
