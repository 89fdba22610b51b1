"""Compare erasure methods across ``bench/erase.py`` result files, on the concepts they share.

Each file may hold different methods (concept vectors in one run, the fine-tuning baselines in
another); the per-method means are recomputed over the concepts *every* method finished, so no
method is averaged over easier concepts than another. Prints one JSON object (means per method,
and per concept the headline figures); ``--png`` draws, per method, where the concept stands
after erasure and how much comes back under adversarial framings, relearning and coefficient
patching; ``--markdown`` also prints the table for an issue note.

    .venv/bin/python bench/erase_compare.py docs/results/erase_smollm2_cpu_cv_tuned.json \\
        docs/results/erase_smollm2_cpu_baselines_tuned.json --png docs/results/erase_recovery.png
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

from erase import summary  # bench/erase.py: the same means as every bench run prints

SHOWN = {"post_target": "post", "post_paraphrase": "para", "control_drop": "ctrl drop",
         "unseen_control_drop": "unseen drop", "near_tune_drop": "near drop (tuned half)",
         "near_control_drop": "near drop (unseen half)",
         "kind_drop": "kind drop",
         "perplexity_rise": "ppl rise", "worst_paragraph_rise": "worst ¶ ppl",
         "adversarial": "adversarial", "relearn_paragraph": "relearn",
         "heldout_after": "held-out after relearn", "coefficient_patch": "coef. patch",
         "value_restore": "value restore", "vector_cosine": "vector cos",
         "erase_seconds": "erase s"}


def merge(paths: list[str]) -> dict:
    """Per concept, the methods of every file (a later file's run of a method wins)."""
    concepts: dict[str, dict] = {}
    for path in paths:
        for name, per in json.loads(Path(path).read_text())["concepts"].items():
            concepts.setdefault(name, {}).update(per)
    methods = {m for per in concepts.values() for m in per}
    shared = {name: per for name, per in concepts.items()
              if methods <= set(per) and not any("error" in r for r in per.values())}
    # a concept where one method found no setting inside the budget leaves every method's
    # means: listed here, so the table never hides that a method gave up
    failed = {m: sorted(name for name, per in concepts.items() if "error" in per.get(m, {}))
              for m in sorted(methods)}
    return {"concepts": shared, "left_out": sorted(set(concepts) - set(shared)),
            "failed": {m: names for m, names in failed.items() if names}}


def markdown(means: dict, failed: dict | None = None) -> str:
    head = "| method | " + " | ".join(SHOWN.values()) + " |"
    rows = [head, "|" + "---|" * (len(SHOWN) + 1)]
    for method, m in means.items():
        cells = [("-" if m.get(k) is None else f"{m[k]:.0f}" if k == "erase_seconds"
                  else f"{m[k]:.2f}") for k in SHOWN]
        rows.append(f"| {method} | " + " | ".join(cells) + " |")
    for method, names in (failed or {}).items():
        rows.append(f"\n{method}: no setting inside the budget for {', '.join(names)}")
    return "\n".join(rows)


def recovery_png(means: dict, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    keys = ["post_target", "adversarial", "relearn_paragraph", "coefficient_patch"]
    labels = ["after erasure", "adversarial\nframing", "relearned on\nparagraph",
              "unedited coefficients\npatched in"]
    fig, ax = plt.subplots(figsize=(9, 4))
    width = 0.8 / len(means)
    for i, (method, m) in enumerate(means.items()):
        ax.bar([x + i * width for x in range(len(keys))], [m[k] or 0 for k in keys], width,
               label=method)
    ax.set_xticks([x + width * (len(means) - 1) / 2 for x in range(len(keys))], labels)
    ax.set_ylabel("concept accuracy (unedited 1.0)")
    ax.set_ylim(0, 1)
    ax.grid(axis="y", alpha=0.3)
    ax.legend(fontsize=8)
    ax.set_title("what comes back: every method tuned to the same budget (the files' "
                 "max_control_drop, max_near_drop, max_perplexity_rise)", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("files", nargs="+")
    ap.add_argument("--png", default=None)
    ap.add_argument("--markdown", action="store_true")
    args = ap.parse_args()
    merged = merge(args.files)
    if not merged["concepts"]:
        raise SystemExit("no concept was run by every method in these files")
    means = summary(merged)
    per_concept = {name: {m: {"post": r["post"]["target_accuracy"],
                              "control": r["post"]["control_accuracy"],
                              "unseen_control": r["post"].get("unseen_control_accuracy"),
                              "near_control": r["post"].get("near_control_accuracy"),
                              "perplexity": r["post"]["perplexity"],
                              "adversarial": r["adversarial"]["target_accuracy"],
                              "relearn": r["relearn"]["target_accuracy"],
                              "coefficient_patch": r["trace"]["coefficient_patch_accuracy"],
                              "setting": r.get("delta", {}).get("setting")}
                          for m, r in per.items()}
                   for name, per in merged["concepts"].items()}
    print(json.dumps({"files": args.files, "concepts": sorted(merged["concepts"]),
                      "left_out": merged["left_out"], "failed": merged["failed"],
                      "means": means,
                      "per_concept": per_concept}, indent=1))
    if args.markdown:
        print(markdown(means, merged["failed"]))
    if args.png:
        recovery_png(means, args.png)


if __name__ == "__main__":
    main()
