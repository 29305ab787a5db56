"""`MultiWayModel(nan_policy=...)`: the policies, the "heads" a non-finite
value is reported for, and the message of `nan_policy="raise"`.

A training step records, for each loss and each update, whether it is
finite, under the index of its head (0 .. num_heads - 1) or one of the two
named heads below. The backends report the first that is not, and the
train function raises `FloatingPointError(nonfinite_message(...))`. (The snapshot and the undo
are `keras_mwbp.algorithm.TrainingStep.undo_unless_finite`, the per-backend
primitives `first_failure`, `restore_unless` and `assert_finite_step`.)
"""

from keras_mwbp.constants import NAN_POLICIES  # noqa: F401

#: The gradient of the joint objective (`standard`, `joint`, `relay`: one
#: update for every loss).
JOINT_HEAD = -1
#: The layers' new state after the forward pass (BatchNorm statistics).
STATE_HEAD = -2


def nonfinite_message(output_names, step, head):
    """The `FloatingPointError` text of `nan_policy="raise"`.

    Args:
        output_names: the model's output names, shallowest head first.
        step: the training step (optimizer iterations, from 0).
        head: where the non-finite value was: a head's index, `JOINT_HEAD`
            or `STATE_HEAD`.
    """
    if head == STATE_HEAD:
        where = "the layers' new state (e.g. BatchNorm statistics)"
    elif head == JOINT_HEAD:
        where = "the gradient of the joint objective"
    else:
        where = (f"the loss or a gradient of head {head} "
                 f"('{output_names[head]}')")
    return (
        f"nan_policy='raise': {where} is not finite at training step "
        f"{step} (optimizer iterations, counted from 0). The step was not "
        "applied: every weight and optimizer state is as before it. "
        "Pass nan_policy='skip_step' to skip such steps, or 'zero' to "
        "replace NaN gradients by zero."
    )
