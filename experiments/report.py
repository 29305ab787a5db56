"""Tables, paired comparisons and plots of a study's finished runs."""

import csv
import math
import os

import numpy as np
from scipy import stats

RUN_COLUMNS = (
    "study", "key", "label", "seed", "dataset", "num_train", "depth", "width",
    "num_losses", "method", "weighting", "nu", "epochs", "batch_size", "lr",
    "warmup_epochs", "weight_decay", "head", "head_name", "head_depth",
    "head_params", "test_accuracy", "train_accuracy", "failed", "error", "epoch_seconds", "step_seconds",
    "first_epoch_seconds", "fit_seconds", "head_train_seconds",
)
SUMMARY_COLUMNS = (
    "label", "head", "head_depth", "head_params", "n_runs", "n_failed",
    "mean_accuracy", "std_accuracy", "mean_accuracy_trained",
    "mean_epoch_seconds", "mean_step_seconds", "mean_train_accuracy",
)
PAIRED_COLUMNS = (
    "group", "a", "b", "head", "n_pairs", "mean_diff", "ci95_low",
    "ci95_high", "a_wins", "b_wins", "ties", "sign_test_p",
)


def label_of(label):
    return ",".join(f"{k}={v}" for k, v in label.items())


def _write_csv(path, columns, rows):
    tmp = path + ".tmp"
    with open(tmp, "w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        writer.writeheader()
        for row in rows:
            writer.writerow({c: row.get(c, "") for c in columns})
    os.replace(tmp, path)


def long_rows(study, entries):
    """One row per (run, head)."""
    out = []
    for label, row in entries:
        c = row["config"]
        for head, acc in enumerate(row["test_accuracy"]):
            out.append(dict(
                study=study, key=row["key"], label=label_of(label),
                seed=c["seed"], dataset=c["dataset"], num_train=c["num_train"],
                depth=c["depth"], width=c["width"], num_losses=c["num_losses"],
                method=c["method"], weighting=c.get("weighting", "paper"),
                weight_decay=c.get("weight_decay", 0.0),
                train_accuracy=(row["train_accuracy"][head]
                                if row.get("train_accuracy") else ""),
                nu=c["nu"], epochs=c["epochs"],
                batch_size=c["batch_size"], lr=c["lr"],
                warmup_epochs=c["warmup_epochs"], head=head,
                head_name=row["head_names"][head],
                head_depth=row["head_depths"][head],
                head_params=row["head_params"][head],
                test_accuracy=acc, failed=row["failed"], error=row["error"] or "",
                epoch_seconds=row["epoch_seconds"],
                step_seconds=row["step_seconds"],
                first_epoch_seconds=row["first_epoch_seconds"],
                fit_seconds=row["fit_seconds"],
                head_train_seconds=row["head_train_seconds"],
            ))
    return out


def paired(a, b):
    """Paired statistics of `a - b` (arrays over the same seeds)."""
    a, b = np.asarray(a, float), np.asarray(b, float)
    keep = np.isfinite(a) & np.isfinite(b)
    d = a[keep] - b[keep]
    n = len(d)
    out = dict(n_pairs=n, mean_diff=float("nan"), ci95_low=float("nan"),
               ci95_high=float("nan"), a_wins=int((d > 0).sum()),
               b_wins=int((d < 0).sum()), ties=int((d == 0).sum()),
               sign_test_p=float("nan"))
    if n == 0:
        return out
    out["mean_diff"] = float(d.mean())
    if n > 1:
        half = stats.t.ppf(0.975, n - 1) * d.std(ddof=1) / math.sqrt(n)
        out["ci95_low"], out["ci95_high"] = d.mean() - half, d.mean() + half
    decided = out["a_wins"] + out["b_wins"]
    if decided:
        out["sign_test_p"] = float(
            stats.binomtest(out["a_wins"], decided, 0.5).pvalue)
    return out


def _mean_train_accuracy(rows, head):
    """Mean training-set accuracy of a head at the end of the runs that
    recorded it (NaN if none did)."""
    values = [r["train_accuracy"][head] for r in rows
              if r.get("train_accuracy") and np.isfinite(r["train_accuracy"][head])]
    return float(np.mean(values)) if values else float("nan")


def summarize(study, entries, spec, folder):
    """Writes runs.csv, summary.csv, paired.csv, table.md and plots."""
    os.makedirs(folder, exist_ok=True)
    runs = long_rows(study, entries)
    _write_csv(os.path.join(folder, "runs.csv"), RUN_COLUMNS, runs)
    by = spec.get("by", [])
    factor = spec["factor"]

    def group_of(label):
        return ",".join(f"{k}={label[k]}" for k in by)

    groups = {}
    for label, row in entries:
        g = groups.setdefault(group_of(label), {})
        g.setdefault(str(label[factor]), []).append(row)
    summary, pairs = [], []
    for gname, levels in groups.items():
        for level, rows in levels.items():
            num_heads = len(rows[0]["test_accuracy"])
            for head in range(num_heads):
                accs = np.array([r["test_accuracy"][head] for r in rows])
                ok = np.array([not r["failed"] for r in rows])
                finite = accs[np.isfinite(accs)]
                summary.append(dict(
                    group=gname, label=(gname + "," if gname else "") + f"{factor}={level}",
                    level=level, head=head,
                    head_depth=rows[0]["head_depths"][head],
                    head_params=rows[0]["head_params"][head],
                    n_runs=len(rows), n_failed=int((~ok).sum()),
                    mean_accuracy=float(finite.mean()) if len(finite) else float("nan"),
                    std_accuracy=float(finite.std(ddof=1)) if len(finite) > 1 else float("nan"),
                    mean_accuracy_trained=float(accs[ok].mean()) if ok.any() else float("nan"),
                    mean_epoch_seconds=float(np.mean([r["epoch_seconds"] for r in rows])),
                    mean_step_seconds=float(np.mean([r["step_seconds"] for r in rows])),
                    mean_train_accuracy=_mean_train_accuracy(rows, head),
                ))
        comparisons = spec.get("pairs") or [
            (other, base) for base in spec["baselines"]
            for other in spec["compare"]
        ]
        for other, base in comparisons:
            if base not in levels or other not in levels or base == other:
                continue
            a = {r["config"]["seed"]: r for r in levels[other]}
            b = {r["config"]["seed"]: r for r in levels[base]}
            seeds = sorted(set(a) & set(b))
            if not seeds:
                continue
            heads_a = len(a[seeds[0]]["test_accuracy"])
            heads_b = len(b[seeds[0]]["test_accuracy"])
            head_list = ([-1] if spec.get("final_only") or heads_a != heads_b
                         else range(heads_a))
            for head in head_list:
                p = paired([a[s]["test_accuracy"][head] for s in seeds],
                           [b[s]["test_accuracy"][head] for s in seeds])
                pairs.append(dict(group=gname, a=other, b=base,
                                  head="final" if head == -1 else head, **p))
    _write_csv(os.path.join(folder, "summary.csv"), ("group", "level") + SUMMARY_COLUMNS, summary)
    _write_csv(os.path.join(folder, "paired.csv"), PAIRED_COLUMNS, pairs)
    _write_markdown(study, spec, summary, pairs, entries, os.path.join(folder, "table.md"))
    _plot(study, spec, summary, folder)
    if study in ("methods", "cost"):
        _cost_table(entries, folder)
    return summary, pairs


def _pct(v):
    return "nan" if not np.isfinite(v) else f"{100 * v:.2f}"


def _write_markdown(study, spec, summary, pairs, entries, path):
    factor = spec["factor"]
    lines = [f"# Study `{study}`", ""]
    configs = [row["config"] for _, row in entries]
    if configs:
        c = configs[0]
        seeds = sorted({k["seed"] for k in configs})
        lines += [
            f"{len(entries)} runs, seeds {seeds}; dataset {c['dataset']} "
            f"(train samples: {c['num_train'] or 'all'}), width {c['width']}, "
            f"{c['epochs']} epochs, batch {c['batch_size']}, lr {c['lr']} with "
            f"{c['warmup_epochs']} warm-up epoch(s), /10 at {c['decay_at']} of the epochs, "
            f"coupled weight decay {c.get('weight_decay', 0.0):g}. "
            f"Failed = final-head test accuracy < 50% (counted, never dropped).",
            "",
        ]
    lines += ["Test accuracy (%), mean ± std over seeds, per head "
              "(columns: head index @ tap depth):", ""]
    groups = {}
    for s in summary:
        groups.setdefault(s["group"], {}).setdefault(s["level"], []).append(s)
    for gname, levels in groups.items():
        if gname:
            lines += [f"**{gname}**", ""]
        width = max(len(v) for v in levels.values())
        first = max(levels.values(), key=len)
        head = [f"{factor}"] + [f"h{s['head']}@{s['head_depth']}" for s in first] + ["failed"]
        lines.append("| " + " | ".join(head) + " |")
        lines.append("|" + "---|" * len(head))
        for level, rows in levels.items():
            cells = [f"{_pct(r['mean_accuracy'])} ± {_pct(r['std_accuracy'])}" for r in rows]
            if len(rows) < width:  # fewer heads: align to the final column
                cells = [""] * (width - len(rows) - 0) + cells
                cells = cells[-width:]
            lines.append(f"| {level} | " + " | ".join(cells)
                         + f" | {rows[0]['n_failed']}/{rows[0]['n_runs']} |")
        lines.append("")
    if any(np.isfinite(s["mean_train_accuracy"]) for s in summary):
        lines += ["Training-set accuracy (%) at the end, mean over seeds, per head "
                  "(convergence check):", ""]
        for gname, levels in groups.items():
            if gname:
                lines += [f"**{gname}**", ""]
            first = max(levels.values(), key=len)
            head = [f"{factor}"] + [f"h{s['head']}@{s['head_depth']}" for s in first]
            lines.append("| " + " | ".join(head) + " |")
            lines.append("|" + "---|" * len(head))
            for level, rows in levels.items():
                lines.append(f"| {level} | " + " | ".join(
                    _pct(r["mean_train_accuracy"]) for r in rows) + " |")
            lines.append("")
    if pairs:
        lines += ["Paired differences a − b over the same seeds (points of accuracy), "
                  "95% t confidence interval, sign test (two-sided):", "",
                  "| group | a − b | head | n | mean | 95% CI | wins a/b/ties | sign p |",
                  "|---|---|---|---|---|---|---|---|"]
        for p in pairs:
            lines.append(
                f"| {p['group'] or '-'} | {p['a']} − {p['b']} | {p['head']} | {p['n_pairs']} | "
                f"{_pct(p['mean_diff'])} | [{_pct(p['ci95_low'])}, {_pct(p['ci95_high'])}] | "
                f"{p['a_wins']}/{p['b_wins']}/{p['ties']} | {p['sign_test_p']:.3g} |")
        lines.append("")
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        f.write("\n".join(lines))
    os.replace(tmp, path)


def _cost_table(entries, folder):
    """Wall time per step and per epoch of each method, same invocation."""
    by = {}
    for label, row in entries:
        by.setdefault(row["config"]["method"], []).append(row)
    base = by.get("standard")
    base_step = np.median([r["step_seconds"] for r in base]) if base else float("nan")
    lines = ["# Cost per method", "",
             "Wall time of `fit` steps after the first epoch (which holds the trace), "
             "median over seeds, one TensorFlow thread, on a shared 2-core CPU; "
             "ratio to standard BP. `heads s` is the frozen-trunk head training "
             "(`train_heads`) of standard BP.", "",
             "| method | ms/step | s/epoch | first epoch s | ratio to standard | heads s |",
             "|---|---|---|---|---|---|"]
    rows = []
    for method, rs in by.items():
        step = float(np.median([r["step_seconds"] for r in rs]))
        epoch = float(np.median([r["epoch_seconds"] for r in rs]))
        first = float(np.median([r["first_epoch_seconds"] for r in rs]))
        heads = float(np.median([r["head_train_seconds"] for r in rs]))
        rows.append(dict(method=method, step_ms=1000 * step, epoch_s=epoch,
                         first_epoch_s=first, ratio=step / base_step, heads_s=heads,
                         n=len(rs)))
        lines.append(f"| {method} | {1000 * step:.1f} | {epoch:.2f} | {first:.1f} | "
                     f"{step / base_step:.2f} | {heads:.1f} |")
    _write_csv(os.path.join(folder, "cost.csv"),
               ("method", "n", "step_ms", "epoch_s", "first_epoch_s", "ratio", "heads_s"), rows)
    with open(os.path.join(folder, "cost.md"), "w") as f:
        f.write("\n".join(lines) + "\n")


def _plot(study, spec, summary, folder):
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    groups = {}
    for s in summary:
        groups.setdefault(s["group"], {}).setdefault(s["level"], []).append(s)
    n = len(groups)
    fig, axes = plt.subplots(1, n, figsize=(5 * n, 4), squeeze=False)
    for ax, (gname, levels) in zip(axes[0], groups.items()):
        for level, rows in levels.items():
            x = [r["head_depth"] for r in rows]
            y = [100 * r["mean_accuracy"] for r in rows]
            e = [100 * r["std_accuracy"] if np.isfinite(r["std_accuracy"]) else 0 for r in rows]
            ax.errorbar(x, y, yerr=e, marker="o", capsize=3, label=f"{spec['factor']}={level}")
        ax.set_xlabel("tap depth of the head (weight layers)")
        ax.set_ylabel("test accuracy (%)")
        ax.set_title(f"{study} {gname}".strip())
        ax.grid(alpha=0.3)
        ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(os.path.join(folder, "accuracy_by_head.png"), dpi=100)
    plt.close(fig)
