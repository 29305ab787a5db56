"""The studies: each is a list of run configs and a way to report them.

Two recipes, each stated once here and in docs/results.md:

- `PAPER`: the studies at the paper's depth (`resnet56_5`, `resnet_depth`,
  `resnet56_nu`, and the `pilot` that chose their epochs): 1-D CIFAR
  ResNets of stage widths 16/32/64 from the zoo (`keras_mwbp.models.
  cifar_resnet`, type-A heads at the paper's places), all 4,000 MNIST-1D
  training signals and the 1,000 test signals, and the paper's recipe
  (`keras_mwbp.recipe`: Nesterov SGD 0.9, coupled weight decay 1e-4,
  batch 128, peak rate 0.1 divided by 10 after 40% and 60% of the epochs,
  nu = 2), plus a linear warm-up over the first epoch (ours, not the
  paper's: it keeps the deep nets' first steps finite).
- `BASE`: the first, small study (`methods`, `depth`, `nu`, `losses`,
  `cost`; ResNet-14 of width 8 on 2,000 signals, 6 epochs, no weight
  decay), kept so that its committed runs stay what they were.

`--quick` shrinks every study to a smoke setting that checks the runner,
not the accuracies.
"""

import keras_mwbp
from keras_mwbp import recipe

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


# The paper's recipe on MNIST-1D (see the module docstring).
PAPER = dict(
    dataset="mnist1d",
    num_train=0,  # all 4,000
    depth=56,
    width=16,
    num_losses=5,
    method="mwbp",
    weighting="paper",
    nu=recipe.NU,
    epochs=60,  # chosen from the pilot (docs/results.md)
    batch_size=recipe.BATCH_SIZE,
    lr=recipe.LEARNING_RATE,
    warmup_epochs=1,
    decay_at=list(recipe.LR_DROPS),
    weight_decay=recipe.WEIGHT_DECAY,
    head_epochs=10,
)
PAPER_SEEDS = tuple(range(8))
# Seeds run in blocks: every setting of a study for seeds 0-3, then 4-7, so
# an interrupted study already holds paired runs of every setting; a block
# of one setting trains on one compiled model.
SEED_BLOCK = 4
PAPER_QUICK = dict(
    num_train=256, depth=8, width=2, num_losses=3, epochs=2, head_epochs=1,
    batch_size=64,
)
# "code" is weighting="reference_code" (the authors' code: each head's own
# layers at the full rate, the trunk's share scaled).
WEIGHTING_SHORT = {"paper": "paper", "reference_code": "code"}
TABLE6_SETTINGS = (
    ("standard", "paper"),
    ("joint", "paper"), ("joint", "reference_code"),
    ("relay", "paper"), ("relay", "reference_code"),
    ("mwbp", "paper"), ("mwbp", "reference_code"),
    ("naive_mwbp", "paper"), ("naive_mwbp", "reference_code"),
)
PAPER_NUS = (0.5, 1.0, 2.0, 5.0, "adaptive-II")
PAPER_DEPTHS = (20, 56, 110)


def training_label(method, weighting):
    """A setting's name in the reports: `method:paper` or `method:code`."""
    if method == "standard":
        return "standard"
    return f"{method}:{WEIGHTING_SHORT[weighting]}"


def _paper_cfg(quick, **changes):
    config = dict(PAPER)
    if quick:
        config.update(PAPER_QUICK)
    config.update(changes)
    return config


def _pairs(weightings, *methods):
    """Paired comparisons `(a, b)`: each method against joint BP under the
    same weighting, then each weighting against the paper's."""
    pairs = []
    for w in weightings:
        for m in methods:
            pairs.append((training_label(m, w), training_label("joint", w)))
    for m in ("joint",) + methods:
        pairs.append((training_label(m, "reference_code"), training_label(m, "paper")))
    return pairs


def paper_study_configs(study, quick=False):
    """`(groups, spec)` of the studies at the paper's depth (`PAPER`)."""
    seeds = QUICK_SEEDS if quick else PAPER_SEEDS
    settings = []
    if study == "pilot":
        for epochs in ((2,) if quick else (15, 30, 60)):
            for weighting in ("paper", "reference_code"):
                label = {"epochs": epochs,
                         "training": training_label("mwbp", weighting)}
                settings.append((label, _paper_cfg(
                    quick, weighting=weighting, epochs=epochs)))
        seeds = (0,)
        spec = dict(factor="training", by=["epochs"], pairs=[
            ("mwbp:code", "mwbp:paper")])
    elif study == "resnet56_5":
        for method, weighting in TABLE6_SETTINGS:
            settings.append((
                {"training": training_label(method, weighting)},
                _paper_cfg(quick, method=method, weighting=weighting),
            ))
        spec = dict(factor="training", pairs=_pairs(
            ("paper", "reference_code"), "mwbp", "relay", "naive_mwbp")
            + [(training_label(m, w), "standard")
               for m, w in TABLE6_SETTINGS if m != "standard"])
    elif study == "resnet_depth":
        for depth in ((8, 14) if quick else PAPER_DEPTHS):
            for method in ("joint", "mwbp"):
                for weighting in ("paper", "reference_code"):
                    settings.append((
                        {"depth": depth,
                         "training": training_label(method, weighting)},
                        _paper_cfg(quick, depth=depth, method=method,
                                   weighting=weighting),
                    ))
        spec = dict(factor="training", by=["depth"],
                    pairs=_pairs(("paper", "reference_code"), "mwbp"))
    elif study == "resnet56_nu":
        nus = (2.0, "adaptive-II") if quick else PAPER_NUS
        for nu in nus:
            settings.append(({"nu": str(nu)}, _paper_cfg(
                quick, weighting="reference_code", nu=nu)))
        spec = dict(factor="nu", pairs=[(str(n), "2.0") for n in nus
                                        if str(n) != "2.0"])
    else:
        raise ValueError(f"unknown study {study!r}")
    spec["shared"] = []
    groups = []
    block = len(seeds) if quick else SEED_BLOCK
    for start in range(0, len(seeds), block):
        for label, config in settings:
            groups.append([(label, dict(config, seed=seed))
                           for seed in seeds[start:start + block]])
    return groups, spec


PAPER_STUDIES = ("pilot", "resnet56_5", "resnet_depth", "resnet56_nu")


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
    if study in PAPER_STUDIES:
        return paper_study_configs(study, quick)
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


STUDIES = PAPER_STUDIES + (
    "methods", "depth", "nu", "losses", "cost", "cifar10_resnet56",
)
