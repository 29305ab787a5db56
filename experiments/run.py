"""Runs one study: `python -m experiments.run STUDY [--quick] [--results DIR]`.

Studies: methods, depth, nu, losses, cost (timings of the methods runs),
cifar10_resnet56 (the paper's CIFAR-10 ResNet-56-5 recipe; needs a local
tensorflow-datasets copy, or `--synthetic` for a smoke run).

Each finished run is one JSON file under `DIR/<study>/runs/`; a second
invocation redoes none of them and only rewrites the reports (runs.csv,
summary.csv, paired.csv, table.md, accuracy_by_head.png).
TensorFlow runs on one thread (intra- and inter-op) unless `--threads`.
"""

import argparse
import os
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_RESULTS = os.path.join(HERE, "results")


def _parser():
    from experiments.studies import STUDIES

    p = argparse.ArgumentParser(prog="python -m experiments.run",
                                description=__doc__.splitlines()[0])
    p.add_argument("study", help=f"one of {', '.join(STUDIES)}")
    p.add_argument("--quick", action="store_true",
                   help="tiny smoke setting (under a minute): checks the runner")
    p.add_argument("--results", default=None,
                   help=f"results folder (default {DEFAULT_RESULTS}; "
                        "--quick defaults to <results>/quick)")
    p.add_argument("--threads", type=int, default=1)
    p.add_argument("--reverse", action="store_true",
                   help="run the study's groups last to first (a second "
                        "process on the same study then meets the first)")
    p.add_argument("--first", default="",
                   help="comma-separated settings of the study's factor to run "
                        "before the others (e.g. mwbp:code,joint:code)")
    p.add_argument("--report-only", action="store_true",
                   help="rewrite the reports from the finished runs; train nothing")
    p.add_argument("--data-dir", default=None, help="cifar10_resnet56: tfds data dir")
    p.add_argument("--synthetic", action="store_true",
                   help="cifar10_resnet56: random CIFAR-shaped data, 2 epochs")
    p.add_argument("--epochs", type=int, default=None,
                   help="cifar10_resnet56: epochs (default 400)")
    p.add_argument("--methods", default="standard,joint,relay,mwbp",
                   help="cifar10_resnet56: comma-separated methods")
    return p


def _set_threads(threads):
    os.environ["TF_NUM_INTRAOP_THREADS"] = str(threads)
    os.environ["TF_NUM_INTEROP_THREADS"] = str(threads)
    import tensorflow as tf

    tf.config.threading.set_intra_op_parallelism_threads(threads)
    tf.config.threading.set_inter_op_parallelism_threads(threads)
    from keras_mwbp.startup import quiet_start_up

    with quiet_start_up():  # TensorFlow's log lines as it finds devices.
        tf.config.list_logical_devices()


def run_study(study, quick, results, report_only=False, reverse=False, first=()):
    from experiments import report
    from experiments import runner
    from experiments.studies import study_configs

    groups, spec = study_configs(study, quick)
    folder = os.path.join(results, study)
    todo, reused = [], 0
    for group in groups:
        pending = []
        for label, config in group:
            key = runner.run_key(config)
            row, copied = runner.find_finished(results, study, key)
            reused += copied
            if row is None:
                pending.append((label, config))
        if pending:
            todo.append(pending)
    total = sum(len(g) for g in groups)
    new = 0
    if not report_only:
        # Groups that another study shares (same configs) run last, and each
        # group is looked up again just before it runs: a study running at
        # the same time may have finished it meanwhile.
        # Groups whose setting is in `first` (the study's factor, e.g.
        # "mwbp:code") run before all others.
        def rank(group):
            setting = str(group[0][0].get(spec["factor"]))
            return (setting not in first,
                    bool(spec.get("shared", ())) and setting in spec["shared"])

        if reverse:  # Before the sort, which keeps this order within a rank.
            todo.reverse()
        todo.sort(key=rank)
        for pending in todo:
            still = []
            for label, config in pending:
                row, copied = runner.find_finished(results, study, runner.run_key(config))
                reused += copied
                if row is None:
                    still.append((label, config))
            pending = still
            if not pending:
                continue
            labels = {runner.run_key(c): label for label, c in pending}

            def on_row(row, labels=labels):
                nonlocal new
                path = os.path.join(folder, "runs", f"{row['key']}.json")
                runner.write_json_atomic(path, row)
                new += 1
                acc = " ".join(f"{a:.3f}" for a in row["test_accuracy"])
                print(f"[{time.strftime('%H:%M:%S')}] {study} {report.label_of(labels[row['key']])} "
                      f"seed={row['config']['seed']}: {acc}"
                      f"{' FAILED' if row['failed'] else ''}"
                      f"{' ' + row['error'] if row['error'] else ''}", flush=True)
                # The reports from every finished run on disk, not from this
                # process's view: a second worker on the same study finishes
                # runs this one never sees in memory, and its reports would
                # otherwise be overwritten by a partial one.
                report.summarize(study, _finished(results, study, groups), spec, folder)

            runner.execute_group([c for _, c in pending], on_row)
    entries = _finished(results, study, groups)
    if entries:
        report.summarize(study, entries, spec, folder)
    print(f"study {study}: {total} runs, {len(entries) - new} already done "
          f"({reused} copied from other studies), {new} new, "
          f"{total - len(entries)} to do; results in {folder}", flush=True)
    return new


def _finished(results, study, groups):
    """`(label, row)` of every finished run of the study, in the study's
    order, read from disk (this study's runs, and those of other studies
    that share a config, which are copied in)."""
    from experiments import runner

    entries = []
    for group in groups:
        for label, config in group:
            row, _ = runner.find_finished(results, study, runner.run_key(config))
            if row is not None:
                entries.append((label, row))
    return entries


def main(argv=None):
    from keras_mwbp.startup import quiet_start_up

    os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "2")
    with quiet_start_up():  # TensorFlow's start-up log lines.
        from experiments.studies import STUDIES

    args = _parser().parse_args(argv)
    if args.study not in STUDIES:
        print(f"error: `study` must be one of {', '.join(STUDIES)}. "
              f"Received: {args.study!r}", file=sys.stderr)
        return 2
    if args.threads < 1:
        print(f"error: `--threads` must be a positive integer. Received: {args.threads}",
              file=sys.stderr)
        return 2
    results = args.results or DEFAULT_RESULTS
    if args.quick and args.results is None:
        results = os.path.join(DEFAULT_RESULTS, "quick")
    if args.study == "cifar10_resnet56":
        from experiments import cifar10_resnet56

        return cifar10_resnet56.main(args, results, _set_threads)
    _set_threads(args.threads)
    first = tuple(s for s in args.first.split(",") if s)
    run_study(args.study, args.quick, results, args.report_only, args.reverse, first)
    return 0


if __name__ == "__main__":
    sys.exit(main())
