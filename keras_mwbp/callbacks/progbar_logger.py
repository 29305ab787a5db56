"""`ProgbarLogger`: Keras's progress bar, with every head's metric on one
short line."""

import math
import os
import re
import sys
import time

import keras
import numpy as np

from keras_mwbp import _compat

# The widest line this logger prints, in columns.
MAX_COLUMNS = 120
# Log keys kept out of the display (they stay in the logs, so in `History`,
# `CSVLogger` and TensorBoard): the loss weights change between epochs only.
_HIDDEN = re.compile(r"(nu|gamma_\d+)")
# Shorter display names of common log names.
_SHORT_NAMES = (("accuracy", "acc"), ("learning_rate", "lr"))
_BAR = "\u2501"  # The line Keras's progress bar is drawn with.


class ProgbarLogger(keras.callbacks.ProgbarLogger):
    """Keras's `ProgbarLogger`, printing a multi-head model's logs compactly.

    `MultiWayModel.fit` installs it when `verbose` is not 0 and `callbacks`
    holds no `keras.callbacks.ProgbarLogger`; pass one in `callbacks` to
    choose `columns`. The final line of an epoch of a 3-head model reads

    ```
    8/8 ━━━━━━━━━━━━━━━━━━━━ 2s 45ms/step - loss 0.503 - acc 59.0 | 97.2 | 99.6
    ```

    and with validation data it goes on with
    `- val loss 0.612 - val acc 64.7 | 97.6 | 97.8`.

    - Each metric compiled for every head appears once, with the heads'
      values in depth order (the model's `output_names`, shallowest first)
      after it, separated by `" | "`. Accuracies are in percent. A head
      without the metric shows `-`.
    - Each head's own loss (`<output>_loss`) is shown this way, as
      `losses`, only when no other metric is compiled; `loss` is the
      training objective.
    - `nu` and the loss weights `gamma_i` are not shown, and `skipped_steps`
      only when it is not 0. The logs themselves are not changed: `History`,
      `CSVLogger` and TensorBoard receive every key.
    - Every printed line fits in `columns`: the bar gets shorter (down to
      none) and the separators lose their spaces before an epoch's final
      line wraps onto indented lines; an in-progress line that still does
      not fit is cut.
    - In a terminal (or a notebook) the line is redrawn in place as Keras's
      is. When stdout is not a terminal (a pipe, a log file) there are no
      redraws and no colour codes: `verbose=1` prints a line at most every
      `log_interval` seconds and each epoch's final line.

    Args:
        columns: Most columns a line may take, at least 20. Default: the
            terminal's width, at most 120, or 120 when stdout is not a
            terminal.
        log_interval: Seconds between two in-progress lines when stdout is
            not a terminal (`verbose=1`).
    """

    async_safe = True  # As Keras's own progress bar, which it adds itself.

    def __init__(self, columns=None, log_interval=30.0):
        super().__init__()
        if columns is not None and (
            isinstance(columns, bool)
            or not isinstance(columns, int)
            or columns < 20
        ):
            raise ValueError(
                "`columns` must be an integer of at least 20, or None. "
                f"Received: columns={columns!r}"
            )
        if (
            isinstance(log_interval, bool)
            or not isinstance(log_interval, (int, float))
            or not log_interval > 0
        ):
            raise ValueError(
                "`log_interval` must be a positive number of seconds. "
                f"Received: log_interval={log_interval!r}"
            )
        self.columns = columns
        self.log_interval = float(log_interval)

    def set_params(self, params):
        verbose = params.get("verbose", 1)
        self.verbose = 1 if verbose == "auto" else verbose
        self.epochs = params.get("epochs", 1)
        self.target = params.get("steps")

    def on_train_begin(self, logs=None):
        self._in_fit = True  # Validation inside fit is silent.

    def on_test_begin(self, logs=None):
        if not self._in_fit:
            self._new_bar()

    def on_predict_begin(self, logs=None):
        self._new_bar()

    def on_epoch_begin(self, epoch, logs=None):
        self._new_bar()
        if self.verbose and self.epochs > 1:
            _compat.io_utils.print_msg(f"Epoch {epoch + 1}/{self.epochs}")

    def on_train_batch_end(self, batch, logs=None):
        self._advance_bar(batch, logs)

    def on_test_batch_end(self, batch, logs=None):
        if not self._in_fit:
            self._advance_bar(batch, logs)

    def on_predict_batch_end(self, batch, logs=None):
        self._advance_bar(batch, None)

    def on_epoch_end(self, epoch, logs=None):
        self._end_bar(logs)

    def on_test_end(self, logs=None):
        if not self._in_fit:
            self._end_bar(logs)

    def on_predict_end(self, logs=None):
        self._end_bar(None)

    def _new_bar(self):
        self.seen = 0
        self.progbar = None

    def _ensure_bar(self):
        if self.progbar is None:
            dynamic = _dynamic_display()
            self.progbar = _CompactProgbar(
                target=self.target,
                verbose=self.verbose,
                output_names=_output_names(self.model),
                columns=self.columns or _columns(dynamic),
                dynamic=dynamic,
                interval=0.05 if dynamic else self.log_interval,
            )

    def _advance_bar(self, batch, logs=None):
        self._ensure_bar()
        self.seen = batch + 1
        if self.verbose == 1:
            self.progbar.update(self.seen, logs or {}, finalize=False)

    def _end_bar(self, logs):
        self._ensure_bar()
        if self.target is None:
            self.target = self.seen
            self.progbar.target = self.target
        if self.verbose:
            self.progbar.update(self.target, logs or {}, finalize=True)

    def get_config(self):
        return {"columns": self.columns, "log_interval": self.log_interval}


class _CompactProgbar:
    """Draws the lines of `ProgbarLogger` (one epoch, or one evaluation)."""

    def __init__(self, target, verbose, output_names, columns, dynamic,
                 interval):
        self.target = target
        self.verbose = verbose
        self.output_names = output_names
        self.columns = columns
        self.dynamic = dynamic
        self.interval = interval
        self._began = time.time()
        # Non-dynamic output waits `interval` before its first line.
        self._last_drawn = 0.0 if dynamic else self._began
        self._first_step_end = None
        self._prev_width = 0

    def update(self, current, logs, finalize):
        now = time.time()
        per_step = self._step_duration(current, now)
        if self.verbose == 1:
            if now - self._last_drawn < self.interval and not finalize:
                return
            lines = self._bar_lines(current, logs, finalize, now, per_step)
        elif self.verbose == 2 and finalize:
            lines = self._summary_lines(current, logs, now, per_step)
        else:
            return
        self._last_drawn = now
        if not self.dynamic:
            message = "\n".join(_plain(line) for line in lines) + "\n"
        else:
            first = lines[0]
            pad = max(0, self._prev_width - _visible_len(first))
            message = "\r" + first + " " * pad
            if finalize:
                message = "\n".join([message] + lines[1:]) + "\n"
                self._prev_width = 0
            else:
                self._prev_width = _visible_len(first)
        _compat.io_utils.print_msg(message, line_break=False)

    # ------------------------------------------------------------- layout
    def _count(self, current):
        if self.target:
            digits = int(math.log10(self.target)) + 1
            return f"{current:{digits}d}/{self.target}"
        return f"{current}/Unknown"

    def _bar_lines(self, current, logs, finalize, now, per_step):
        count = _bold(self._count(current))
        if finalize or not self.target:
            timing = f"{now - self._began:.0f}s"
        else:
            timing = _eta(per_step * (self.target - current))
        timing = _bold(timing) + " " + _per_step(per_step)
        # What gives way first: the bar of a final line (it is full), then
        # the separators' spaces, then an in-progress line's bar.
        if finalize:
            layouts = ((" | ", True), (" | ", False), ("|", True), ("|", False))
        else:
            layouts = ((" | ", True), ("|", True), (" | ", False), ("|", False))
        for sep, with_bar in layouts:
            items = _display_items(logs, self.output_names, sep)
            info = timing + "".join(f" - {item}" for item in items)
            room = self.columns - _visible_len(count) - 2 - _visible_len(info)
            if with_bar and self.target and room >= 4:
                width = min(20, room)
                done = int(width * current / self.target)
                bar = (
                    (_green(_BAR * done) if done else "")
                    + _grey(_BAR * (width - done))
                )
                return [f"{count} {bar} {info}"]
            if not with_bar and room >= -1:
                return [f"{count} {info}"]
        return self._fit(f"{count} {timing}", items, finalize)

    def _summary_lines(self, current, logs, now, per_step):
        head = (
            f"{self._count(current)} - {now - self._began:.0f}s - "
            f"{_per_step(per_step)}"
        )
        for sep in (" | ", "|"):
            items = _display_items(logs, self.output_names, sep)
            line = head + "".join(f" - {item}" for item in items)
            if len(line) <= self.columns:
                return [line]
        return self._fit(head, items, finalize=True)

    def _fit(self, head, items, finalize):
        """`head` and `items` on lines of at most `columns` columns: wrapped
        (continuation lines indented) when final, else cut."""
        if not finalize:
            line = head + "".join(f" - {item}" for item in items)
            if _visible_len(line) <= self.columns:
                return [line]
            return [_cut(line, self.columns)]
        lines, line = [], head
        for item in items:
            piece = f" - {item}"
            if _visible_len(line) + len(piece) > self.columns and (
                _visible_len(line.strip()) > 0
            ):
                lines.append(line)
                line = "   "
            line += piece
        lines.append(line)
        return [_cut(text, self.columns) for text in lines]

    def _step_duration(self, current, now):
        if not current:
            return 0.0
        if self._first_step_end is not None and current > 1:
            duration = (now - self._first_step_end) / (current - 1)
        else:
            duration = (now - self._began) / current
        if current == 1:
            self._first_step_end = now
        return duration


# ------------------------------------------------------------ log display
def _display_items(logs, output_names, sep):
    """The display items (`"name value"`) of `logs`: training ones, then
    validation ones (`"val name value"`)."""
    train, val = {}, {}
    for key, value in logs.items():
        if key.startswith("val_"):
            val[key[4:]] = value
        else:
            train[key] = value
    items = _part_items(train, output_names, sep, "")
    return items + _part_items(val, output_names, sep, "val ")


def _part_items(logs, output_names, sep, prefix):
    scalars = []
    groups = {}  # metric -> {head index: value}
    by_length = sorted(
        enumerate(output_names), key=lambda item: -len(item[1])
    )
    for key, value in logs.items():
        if _HIDDEN.fullmatch(key):
            continue
        value = _scalar(value)
        if value is None:
            continue
        for index, name in by_length:
            if key.startswith(name + "_") and len(key) > len(name) + 1:
                groups.setdefault(key[len(name) + 1:], {})[index] = value
                break
        else:
            if key == "skipped_steps" and value == 0:
                continue
            scalars.append((key, value))
    if len(groups) > 1 or len(output_names) < 2:
        groups.pop("loss", None)  # Each head's loss when nothing else.
    items = [f"{prefix}{_short(k)} {_format(k, v)}" for k, v in scalars]
    for metric, values in groups.items():
        shown = [
            _format(metric, values[i]) if i in values else "-"
            for i in range(len(output_names))
        ]
        label = "losses" if metric == "loss" else _short(metric)
        items.append(f"{prefix}{label} {sep.join(shown)}")
    return items


def _scalar(value):
    try:
        return float(np.mean(np.asarray(value, dtype="float64")))
    except (TypeError, ValueError):
        return None


def _short(name):
    for long, short in _SHORT_NAMES:
        name = name.replace(long, short)
    return name


def _format(name, value):
    if "acc" in _short(name) and 0.0 <= value <= 1.0:
        return f"{100.0 * value:.1f}"
    if name == "skipped_steps":
        return str(int(value))
    if value == 0 or 1e-3 <= abs(value) < 1e4:
        return f"{value:.3f}"
    return f"{value:.2e}"


# --------------------------------------------------------------- terminal
def _dynamic_display():
    """Whether lines can be redrawn in place (a terminal or a notebook)."""
    isatty = getattr(sys.stdout, "isatty", None)
    try:
        terminal = bool(isatty and isatty())
    except ValueError:  # A closed stream.
        terminal = False
    return terminal or "ipykernel" in sys.modules


def _columns(dynamic):
    if dynamic:
        try:
            width = os.get_terminal_size(sys.stdout.fileno()).columns
        except (AttributeError, OSError, ValueError):
            width = 0
        if width >= 20:
            return min(width, MAX_COLUMNS)
    return MAX_COLUMNS


def _output_names(model):
    return list(getattr(model, "output_names", None) or [])


def _eta(seconds):
    if seconds > 3600:
        return "%d:%02d:%02d" % (
            seconds // 3600, (seconds % 3600) // 60, seconds % 60
        )
    if seconds > 60:
        return "%d:%02d" % (seconds // 60, seconds % 60)
    return "%ds" % seconds


def _per_step(seconds):
    if seconds >= 1 or seconds == 0:
        return f"{seconds:.0f}s/step"
    if seconds >= 1e-3:
        return f"{seconds * 1e3:.0f}ms/step"
    return f"{seconds * 1e6:.0f}us/step"


_ANSI = re.compile(r"\x1b\[[0-9;]*m")


def _bold(text):
    return f"\x1b[1m{text}\x1b[0m"


def _green(text):
    return f"\x1b[32m{text}\x1b[0m"


def _grey(text):
    return f"\x1b[37m{text}\x1b[0m"


def _plain(text):
    return _ANSI.sub("", text)


def _visible_len(text):
    return len(_plain(text))


def _cut(text, columns):
    """`text` cut to `columns` visible columns (colour codes kept closed)."""
    if _visible_len(text) <= columns:
        return text
    plain = _plain(text)
    return plain[: columns - 3] + "..."
