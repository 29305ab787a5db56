"""All seven backpropagation methods on the digits, side by side.

Trains the same ResNet-14 with 3 heads (same initial weights, same data
order) with each method and prints every head's test accuracy per method.
On so shallow a network the methods end close together; the paper's gains
show on deep networks (ResNet-56).

Run: `python examples/compare_methods_digits.py [--epochs N]`.
"""

import argparse

import keras

import keras_mwbp
from keras_mwbp import data
from keras_mwbp.models import cifar_resnet


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--epochs", type=int, default=15)
    args = parser.parse_args()
    train, test, info = data.load("digits", batch_size=64, seed=0)
    initial = None
    results = {}
    for method in keras_mwbp.METHODS:
        keras.utils.set_random_seed(0)
        model = cifar_resnet(14, num_classes=info["num_classes"],
                             num_losses=3, input_shape=info["input_shape"],
                             method=method)
        if initial is None:
            initial = model.get_weights()
        model.set_weights(initial)
        model.compile(
            optimizer=keras.optimizers.SGD(0.05, momentum=0.9, nesterov=True),
            loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
            metrics=["accuracy"],
        )
        model.fit(train, epochs=args.epochs, verbose=0)
        logs = model.evaluate(test, return_dict=True, verbose=0)
        results[method] = [logs[f"{name}_accuracy"]
                           for name in model.output_names]
        print(method, " ".join(f"{a:.4f}" for a in results[method]))
    names = model.output_names
    print(f"{'method':20s}" + "".join(f"{n:>16s}" for n in names))
    for method, accuracies in results.items():
        print(f"{method:20s}" + "".join(f"{a:16.2%}" for a in accuracies))


if __name__ == "__main__":
    main()
