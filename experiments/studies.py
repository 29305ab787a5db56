"""The studies: each is a list of run configs and a way to report them.

`BASE` is the recipe shared by all MNIST-1D runs (stated in full in
docs/results.md). `--quick` shrinks every study to a smoke setting that
checks the runner, not the accuracies.
"""

import keras_mwbp

SEEDS = (0, 1, 2, 3, 4)

# The recipe: SGD + Nesterov momentum 0.9, no weight decay, batch 128,
# peak learning rate 0.1 reached by a linear warm-up over the first epoch,
# divided by 10 after 50% and 75% of the epochs (WarmupStepDecay).
# Sized for a shared 2-core CPU (see docs/results.md).
BASE = dict(
    dataset="mnist1d",
    num_train=2000,
    depth=14,
    width=8,
    num_losses=3,
    method="mwbp",
    nu=2.0,
    epochs=6,
    batch_size=128,
    lr=0.1,
    warmup_epochs=1,
    decay_at=[0.5, 0.75],
    head_epochs=3,
)
QUICK = dict(
    num_train=128, depth=8, width=2, num_losses=3, epochs=2, head_epochs=1,
    batch_size=64,
)
QUICK_SEEDS = (0, 1)
NUS = (0.0, 0.5, 1.0, 2.0, 5.0, "adaptive-I", "adaptive-II")
# Table 8 has 1, 2, 5, 10, 25 losses; ResNet-20 has 9 blocks, so 9 heads
# (one per block) is its most.
LOSSES = (1, 2, 3, 5, 9)


def _cfg(quick, **changes):
    config = dict(BASE)
    config.update(changes)
    if quick:
        for name, value in QUICK.items():
            if name not in changes or name in ("num_train", "epochs", "head_epochs", "batch_size"):
                config[name] = value
    if config["num_losses"] == 1:
        config["method"] = "standard"
    return config


def study_configs(study, quick=False):
    """`(groups, spec)`: lists of configs that differ only in the seed (run
    one after another on one compiled model), and the report spec."""
    seeds = QUICK_SEEDS if quick else SEEDS
    settings = []  # (label dict, config without seed)
    if study in ("methods", "cost"):  # cost: the timings of the same runs
        methods = ("standard", "joint") if quick else keras_mwbp.METHODS
        for m in methods:
            settings.append(({"method": m}, _cfg(quick, method=m)))
        spec = dict(factor="method", baselines=["joint", "standard"],
                    compare=["joint"] if quick else
                    ["mwbp", "reverse_mwbp", "naive_mwbp", "relay"])
    elif study == "depth":
        datasets = ("mnist1d",) if quick else ("mnist1d", "digits")
        for dataset in datasets:
            depths = (8,) if quick else (8, 20, 32) if dataset == "mnist1d" else (8, 20)
            for d in depths:
                for m in (("standard", "joint") if quick else ("standard", "joint", "mwbp")):
                    extra = {}
                    if dataset == "digits":
                        extra = dict(num_train=0, batch_size=64 if not quick else 64)
                    settings.append((
                        {"dataset": dataset, "depth": d, "method": m},
                        _cfg(quick, dataset=dataset, depth=d, method=m,
                             num_losses=3, **extra),
                    ))
        spec = dict(factor="method", by=["dataset", "depth"],
                    baselines=["joint", "standard"], compare=["joint"] if quick else ["mwbp"])
    elif study == "nu":
        nus = (2.0, "adaptive-II") if quick else NUS
        for nu in nus:
            settings.append(({"nu": str(nu)}, _cfg(quick, nu=nu)))
        spec = dict(factor="nu", baselines=["2.0"], shared=["2.0"], compare=[str(n) for n in nus if str(n) != "2.0"])
    elif study == "losses":
        ks = (1, 2) if quick else LOSSES
        for k in ks:
            settings.append(({"num_losses": k}, _cfg(quick, num_losses=k, depth=14 if quick else 20)))
        spec = dict(factor="num_losses", baselines=["1"], compare=[str(k) for k in ks if k != 1],
                    final_only=True)
    else:
        raise ValueError(f"unknown study {study!r}")
    groups = []
    for label, config in settings:
        groups.append([
            (label, dict(config, seed=seed)) for seed in seeds
        ])
    return groups, spec


STUDIES = ("methods", "depth", "nu", "losses", "cost", "cifar10_resnet56")
