"""Compare erasure methods across result files of the older, single-split ``bench/erase.py``
(``--out FILE``), on the concepts they share; ``bench/erase.py --save`` now summarises its own
runs over split seeds.

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


def _mean(values: list) -> float | None:
    values = [v for v in values if v is not None]
    return sum(values) / len(values) if values else None


def summary(result: dict) -> dict:
    """Per method, the mean over concepts of each headline figure (concepts where the method
    raised are counted in ``failed``)."""
    keys = {
        "pre_target": lambda r: r["pre"]["target_accuracy"],
        "post_target": lambda r: r["post"]["target_accuracy"],
        "post_paraphrase": lambda r: r["post"]["paraphrase_accuracy"],
        "control_drop": lambda r: r["pre"]["control_accuracy"] - r["post"]["control_accuracy"],
        "unseen_control_drop": lambda r: None if r["post"].get("unseen_control_accuracy")
        is None else r["pre"]["unseen_control_accuracy"] - r["post"]["unseen_control_accuracy"],
        "near_control_drop": lambda r: None if r["post"].get("near_control_accuracy")
        is None else r["pre"]["near_control_accuracy"] - r["post"]["near_control_accuracy"],
        "near_tune_drop": lambda r: None if r["post"].get("near_control_tune_accuracy")
        is None else r["pre"]["near_control_tune_accuracy"]
        - r["post"]["near_control_tune_accuracy"],
        "kind_drop": lambda r: None if r["post"].get("kind_accuracy") is None
        else r["pre"]["kind_accuracy"] - r["post"]["kind_accuracy"],
        "worst_paragraph_rise": lambda r: r.get("perplexity_worst_rise"),
        "perplexity_rise": lambda r: r["post"]["perplexity"] / r["pre"]["perplexity"] - 1,
        "adversarial": lambda r: r["adversarial"]["target_accuracy"],
        "relearn_paragraph": lambda r: r["relearn"]["target_accuracy"],
        "heldout_before": lambda r: r["relearn"].get("heldout", {}).get("before"),
        "heldout_after": lambda r: r["relearn"].get("heldout", {}).get("target_accuracy"),
        "heldout_unedited": lambda r: r["relearn"].get("heldout", {}).get("unedited"),
        "vector_cosine": lambda r: r["trace"]["concept_vector_cosine"],
        "coefficient_patch": lambda r: r["trace"]["coefficient_patch_accuracy"],
        "erase_seconds": lambda r: r["erase_seconds"],
    }
    methods: dict[str, dict] = {}
    for per in result["concepts"].values():
        for method, r in per.items():
            m = methods.setdefault(method, {"concepts": 0, "failed": 0,
                                            **{k: [] for k in keys}})
            if "error" in r:
                m["failed"] += 1
                continue
            m["concepts"] += 1
            for k, f in keys.items():
                m[k].append(f(r))
    return {method: {k: (_mean(v) if isinstance(v, list) else v) for k, v in m.items()}
            for method, m in methods.items()}


SHOWN = {"post_target": "post", "post_paraphrase": "para", "control_drop": "ctrl drop",
         "unseen_control_drop": "unseen drop", "near_tune_drop": "near drop (tuned half)",
         "near_control_drop": "near drop (unseen half)",
         "kind_drop": "kind drop",
         "perplexity_rise": "ppl rise", "worst_paragraph_rise": "worst ¶ ppl",
         "adversarial": "adversarial", "relearn_paragraph": "relearn",
         "heldout_after": "held-out after relearn", "coefficient_patch": "coef. patch",
         "vector_cosine": "vector cos",
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
    ax.set_title("what comes back: every method tuned to the same specificity budget",
                 fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def tradeoff_png(concepts: dict, path: str) -> None:
    """Every setting each tuner tried, on every concept: concept accuracy against what it
    cost (control accuracy and near-control accuracy on the tuned half, each lost against the
    unedited model, and perplexity on the tuner's half of the neutral text). Open
    markers left the budget; the filled ones were inside it. The lines are the trade-off
    curves: the mean over concepts of the lowest concept accuracy reached at no more than x
    of that cost."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    costs = [("control accuracy lost", lambda t, pre: pre["control_accuracy"]
              - t["control_accuracy"]),
             ("near-control accuracy lost (tuned half)", lambda t, pre: None
              if t.get("near_control_accuracy") is None
              else pre["near_control_tune_accuracy"] - t["near_control_accuracy"]),
             # the tuning half of the neutral text is the same for every concept: raw values
             ("perplexity on neutral text (tuning half)", lambda t, pre: t["perplexity"])]
    fig, axes = plt.subplots(1, len(costs), figsize=(5 * len(costs), 4.2), sharey=True)
    methods = sorted({m for per in concepts.values() for m in per})
    colours = dict(zip(methods, plt.rcParams["axes.prop_cycle"].by_key()["color"],
                       strict=False))
    xs = [i / 100 for i in range(0, 31)]
    for method in methods:
        # per cost, per concept: the lowest concept accuracy any setting reached at no more
        # than x of this cost alone (the unedited accuracy where none did); the line averages
        curves: list[list[list[float]]] = [[] for _ in costs]
        for per in concepts.values():
            r = per.get(method, {})
            trials = r.get("tuning") or []
            for k, (ax, (_, cost)) in enumerate(zip(axes, costs, strict=True)):
                pts = [(cost(t, r["pre"]), t["target_accuracy"], t["ok"]) for t in trials]
                pts = [p for p in pts if p[0] is not None]
                for ok in (True, False):
                    ax.scatter([x for x, _, o in pts if o is ok],
                               [y for _, y, o in pts if o is ok], s=12, alpha=0.5,
                               color=colours[method],
                               facecolors=colours[method] if ok else "none")
                if pts and k < 2:  # perplexity is no cost axis to sweep
                    curves[k].append([min([y for c, y, _ in pts if c <= x + 1e-9],
                                          default=r["pre"]["target_accuracy"]) for x in xs])
        for ax, cs in zip(axes, curves, strict=True):
            if cs:
                ax.plot(xs, [sum(c[i] for c in cs) / len(cs) for i in range(len(xs))],
                        color=colours[method], lw=2)
    for ax, (label, _) in zip(axes, costs, strict=True):
        ax.set_xlabel(label)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("concept accuracy after erasure")
    for method in methods:
        axes[0].scatter([], [], color=colours[method], label=method)
    axes[0].legend(fontsize=8)
    fig.suptitle("every tuner's settings on every concept (filled: inside the budget); "
                 "lines: mean over concepts of the best concept accuracy at ≤ x")
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("files", nargs="+")
    ap.add_argument("--png", default=None)
    ap.add_argument("--tradeoff-png", default=None)
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
    if args.tradeoff_png:
        tradeoff_png(merged["concepts"], args.tradeoff_png)


if __name__ == "__main__":
    main()
