"""Face (or any pair) verification with each head's embedding.

Two samples are "the same identity" when the cosine similarity of their
embeddings exceeds a threshold. The functions here follow the LFW protocol
(Huang et al. 2007): the pairs come in `num_folds` consecutive folds; for
each fold the threshold that is most accurate on the other folds is applied
to it, and the accuracy is the mean (and standard deviation) over the folds.
`tar_at_far` reports the true-accept rate at a given false-accept rate.

`read_pairs` reads LFW's `pairs.txt`; `head_embeddings` takes the embedding
of every cosine head of a model (`keras_mwbp.heads.cosine_head`), and
`verify` puts it together per head. NumPy only, apart from the model's
`predict`.
"""

import os

import numpy as np


def cosine_similarity(a, b):
    """Row-wise cosine similarity of two `(n, dim)` arrays."""
    a = np.asarray(a, dtype=np.float64)
    b = np.asarray(b, dtype=np.float64)
    if a.ndim != 2 or a.shape != b.shape:
        raise ValueError(
            "`a` and `b` must be arrays of the same shape (pairs, dim). "
            f"Received: shapes {a.shape} and {b.shape}"
        )
    norms = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
    return np.sum(a * b, axis=1) / np.maximum(norms, 1e-12)


def _check_scores(similarities, issame):
    similarities = np.asarray(similarities, dtype=np.float64)
    issame = np.asarray(issame)
    if similarities.ndim != 1 or issame.shape != similarities.shape:
        raise ValueError(
            "`similarities` and `issame` must be 1-D arrays of the same "
            f"length. Received: shapes {similarities.shape} and {issame.shape}"
        )
    if issame.dtype != bool:
        raise TypeError(
            "`issame` must be a boolean array. "
            f"Received: dtype {issame.dtype}"
        )
    return similarities, issame


def best_threshold(similarities, issame):
    """The threshold `t` (pairs with similarity > t are "same") that is most
    accurate on these pairs. The candidates are the midpoints between
    neighbouring similarities and one value below and one above them all;
    among equally accurate candidates, the lowest.

    Returns:
        `(threshold, accuracy)`.
    """
    similarities, issame = _check_scores(similarities, issame)
    values = np.unique(similarities)
    candidates = np.concatenate(
        [[values[0] - 1.0], (values[:-1] + values[1:]) / 2, [values[-1] + 1.0]]
    )
    accuracies = [np.mean((similarities > t) == issame) for t in candidates]
    best = int(np.argmax(accuracies))
    return float(candidates[best]), float(accuracies[best])


def lfw_accuracy(similarities, issame, num_folds=10):
    """The LFW protocol's verification accuracy.

    The pairs are split into `num_folds` consecutive folds (LFW's
    `pairs.txt` lists them fold by fold). For each fold, the threshold is
    `best_threshold` of the other folds' pairs, and the fold's accuracy is
    measured with it.

    Args:
        similarities: 1-D array, one similarity per pair.
        issame: 1-D boolean array, whether each pair is one identity.
        num_folds: Number of folds, an int from 2 to the number of pairs.

    Returns:
        A dict: `mean` and `std` (population) of the folds' accuracies,
        `accuracies` and `thresholds` per fold.
    """
    similarities, issame = _check_scores(similarities, issame)
    if (
        isinstance(num_folds, bool)
        or not isinstance(num_folds, int)
        or not 2 <= num_folds <= len(similarities)
    ):
        raise ValueError(
            "`num_folds` must be an integer from 2 to the number of pairs "
            f"({len(similarities)}). Received: num_folds={num_folds!r}"
        )
    folds = np.array_split(np.arange(len(similarities)), num_folds)
    accuracies, thresholds = [], []
    for k, test in enumerate(folds):
        train = np.concatenate([f for j, f in enumerate(folds) if j != k])
        threshold, _ = best_threshold(similarities[train], issame[train])
        thresholds.append(threshold)
        accuracies.append(
            float(np.mean((similarities[test] > threshold) == issame[test]))
        )
    return {
        "mean": float(np.mean(accuracies)),
        "std": float(np.std(accuracies)),
        "accuracies": accuracies,
        "thresholds": thresholds,
    }


def tar_at_far(similarities, issame, far):
    """The true-accept rate at false-accept rate `far`: with the lowest
    threshold `t` at which at most a fraction `far` of the different-identity
    pairs has similarity > t, the fraction of same-identity pairs above it.

    Returns:
        `(tar, threshold)`.
    """
    similarities, issame = _check_scores(similarities, issame)
    if isinstance(far, bool) or not isinstance(far, (int, float)) or not (
        0 <= far <= 1
    ):
        raise ValueError(f"`far` must be a number in [0, 1]. Received: far={far!r}")
    negatives = np.sort(similarities[~issame])[::-1]  # Highest first.
    positives = similarities[issame]
    if not len(negatives) or not len(positives):
        raise ValueError(
            "`issame` must hold both same and different pairs to measure "
            "TAR at FAR."
        )
    allowed = int(np.floor(far * len(negatives) + 1e-9))  # False accepts.
    threshold = float(
        negatives[allowed] if allowed < len(negatives) else negatives[-1] - 1.0
    )
    return float(np.mean(positives > threshold)), threshold


def read_pairs(path, image_dir="", extension=".jpg"):
    """Reads an LFW `pairs.txt`.

    Lines `name i j` are pairs of one identity, lines `name1 i name2 j` of
    two; image `i` of `name` is `image_dir/name/name_{i:04d}{extension}`. A
    first line of one or two integers (folds, pairs per fold) is skipped.

    Returns:
        `(paths_a, paths_b, issame)`: two lists of file paths and a boolean
        array, in the file's order.
    """
    if not os.path.isfile(path):
        raise FileNotFoundError(f"The pairs file {path!r} does not exist.")

    def image(name, index):
        return os.path.join(image_dir, name, f"{name}_{int(index):04d}{extension}")

    paths_a, paths_b, issame = [], [], []
    with open(path) as f:
        lines = [line.split() for line in f if line.strip()]
    if lines and all(field.isdigit() for field in lines[0]) and len(lines[0]) <= 2:
        lines = lines[1:]
    for number, fields in enumerate(lines, 1):
        if len(fields) == 3:
            name, i, j = fields
            paths_a.append(image(name, i))
            paths_b.append(image(name, j))
            issame.append(True)
        elif len(fields) == 4:
            name_a, i, name_b, j = fields
            paths_a.append(image(name_a, i))
            paths_b.append(image(name_b, j))
            issame.append(False)
        else:
            raise ValueError(
                f"{path}: pair {number} must be `name i j` or `name1 i name2 "
                f"j`. Received: {' '.join(fields)!r}"
            )
    return paths_a, paths_b, np.array(issame, dtype=bool)


def head_embeddings(model):
    """A model from `model`'s inputs to the embedding of each of its cosine
    heads (the input of each output's `keras_mwbp.CosineLogits` layer), in
    the order of `model.output_names`."""
    import keras

    from keras_mwbp.cosine_logits import CosineLogits

    from keras_mwbp.graph import producing_node

    embeddings = []
    for name, output in zip(model.output_names, model.outputs):
        node = producing_node(output)
        # Through the Identity layers that name the outputs.
        while node is not None and isinstance(node.operation, keras.layers.Identity):
            node = producing_node(node.operation.input)
        if node is None or not isinstance(node.operation, CosineLogits):
            raise ValueError(
                "`model` must end every output in a CosineLogits layer "
                f"(keras_mwbp.heads.cosine_head). Output {name!r} does not."
            )
        embeddings.append(node.operation.input)
    return keras.Model(model.inputs, embeddings)


def verify(model, x_a, x_b, issame, num_folds=10, far=1e-3, batch_size=256):
    """Per-head verification of image pairs `(x_a[k], x_b[k])`.

    Returns:
        One dict per head (`model.output_names` order): `head`, `output`,
        `accuracy` and `std` (the LFW protocol, `num_folds` folds),
        `tar` at `far` and `far`.
    """
    embedder = head_embeddings(model)
    a = embedder.predict(x_a, batch_size=batch_size, verbose=0)
    b = embedder.predict(x_b, batch_size=batch_size, verbose=0)
    if len(model.output_names) == 1:
        a, b = [a], [b]
    rows = []
    for index, (name, ea, eb) in enumerate(zip(model.output_names, a, b)):
        scores = cosine_similarity(ea, eb)
        lfw = lfw_accuracy(scores, issame, num_folds)
        tar, _ = tar_at_far(scores, issame, far)
        rows.append({"head": index, "output": name, "accuracy": lfw["mean"],
                     "std": lfw["std"], "tar": tar, "far": far})
    return rows
