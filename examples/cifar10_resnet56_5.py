"""CIFAR-10 MwResNet-56-5 with the paper's recipe (Guo et al. 2020, Table 1).

ResNet-56 with 5 losses (heads after layers 15, 25, 35, 45), MW-BP, nu = 2,
SGD with Nesterov momentum 0.9, coupled weight decay 1e-4 in every update,
batch 128, 400 epochs, learning rate 0.1 divided by 10 after 40% and 60% of
the epochs (`keras_mwbp.recipe`). The paper reports 5.53% test error for the
final head and 5.67% for model-45.

CIFAR-10 must be available locally as a tensorflow-datasets copy (nothing is
downloaded): `python examples/cifar10_resnet56_5.py --data-dir DIR`.
"""

import argparse
import math

import keras

import keras_mwbp
from keras_mwbp import data
from keras_mwbp import recipe
from keras_mwbp.models import cifar_resnet
from keras_mwbp.report import format_table
from keras_mwbp.report import report


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--data-dir", required=True)
    parser.add_argument("--epochs", type=int, default=400)
    parser.add_argument("--output-dir", default="runs/cifar10-resnet56-5")
    args = parser.parse_args()

    keras.utils.set_random_seed(0)
    train, test, info = data.load("cifar10", batch_size=recipe.BATCH_SIZE,
                                  data_dir=args.data_dir)
    model = cifar_resnet(56, num_classes=10, num_losses=5, method="mwbp",
                         nu=recipe.NU, weight_decay=recipe.WEIGHT_DECAY)
    steps_per_epoch = math.ceil(info["num_train"] / recipe.BATCH_SIZE)
    schedule = recipe.learning_rate_schedule(steps_per_epoch, args.epochs)
    model.compile(
        optimizer=recipe.sgd(schedule),
        loss=keras.losses.SparseCategoricalCrossentropy(from_logits=True),
        metrics=["accuracy"],
    )
    model.fit(
        train, epochs=args.epochs, validation_data=test,
        callbacks=[
            keras.callbacks.ModelCheckpoint(f"{args.output_dir}/model.keras"),
            keras.callbacks.BackupAndRestore(f"{args.output_dir}/backup"),
            keras_mwbp.callbacks.TensorBoard(f"{args.output_dir}/logs"),
        ],
    )
    print(format_table(report(model, test)))


if __name__ == "__main__":
    main()
