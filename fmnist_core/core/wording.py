"""Sentences of the pages that depend on the numbers: a model that has not learned, a gain within the noise.

A page never states a claim its own numbers do not carry. The chapter notebooks pass their runs' results to
these functions and show what comes back; the thresholds are module constants, so that a reader (and the
tests) can see what "near chance" and "measurable" mean here.
"""
from __future__ import annotations

import math
from dataclasses import dataclass

CHANCE_POINTS = 5.0      # an accuracy within this many percentage points of 1/classes is "at chance"
CHANCE_LOSS_SHARE = 0.03  # a cross-entropy within 3 % of ln(classes), the loss of a uniform guess, is too
NOISE_STDS = 2.0         # a gain smaller than this many seed standard deviations is "no measurable gain"


@dataclass(frozen=True)
class RunScore:
    """One run as the chance-level check sees it.

    Attributes
    ----------
    name : str
        How the page names the run (``"m2 @ 100 labels"``).
    accuracy : float
        Its test accuracy, in [0, 1].
    loss : float or None
        Its final cross-entropy in nats per image (training or validation), when it has one.
    """
    name: str
    accuracy: float
    loss: float | None = None


def _pct(fraction: float) -> str:
    return f"{100 * fraction:.1f} %"


def at_chance(accuracy: float, num_classes: int, loss: float | None = None) -> bool:
    """Whether a run's accuracy is within :data:`CHANCE_POINTS` points of chance or its cross-entropy within
    :data:`CHANCE_LOSS_SHARE` of ``ln(num_classes)``.

    Parameters
    ----------
    accuracy : float
        Test accuracy in [0, 1].
    num_classes : int
        Number of classes (chance is ``1 / num_classes``).
    loss : float, optional
        Cross-entropy in nats per image.

    Returns
    -------
    bool

    Raises
    ------
    ValueError
        When ``num_classes`` is below 2 or ``accuracy`` is outside [0, 1].
    """
    if num_classes < 2:
        raise ValueError(f"num_classes must be at least 2, got {num_classes}")
    if not 0.0 <= accuracy <= 1.0:
        raise ValueError(f"accuracy must be in [0, 1], got {accuracy}")
    near_chance = 100 * (accuracy - 1 / num_classes) < CHANCE_POINTS
    uniform = math.log(num_classes)
    near_uniform_loss = loss is not None and math.isfinite(loss) and abs(loss - uniform) <= CHANCE_LOSS_SHARE * uniform
    return near_chance or near_uniform_loss


def chance_note(runs: list[RunScore], num_classes: int, remedy: str) -> str:
    """A Markdown paragraph naming the runs that have not learned at this budget, or ``""`` when none.

    Parameters
    ----------
    runs : list of RunScore
        The runs the page reports.
    num_classes : int
        Number of classes.
    remedy : str
        What would change that for this chapter (a sentence: more epochs, steps, labels, ...).

    Returns
    -------
    str
        E.g. "**Not learned at this budget.** m2 @ 100 labels (23.6 %, cross-entropy 2.33): ..." The sentence
        stays for any budget, the users' own included.
    """
    stuck = [r for r in runs if at_chance(r.accuracy, num_classes, r.loss)]
    if not stuck:
        return ""
    uniform = math.log(num_classes)

    def described(run: RunScore) -> str:
        loss = f", cross-entropy {run.loss:.2f}" if run.loss is not None and math.isfinite(run.loss) else ""
        return f"{run.name} ({_pct(run.accuracy)}{loss})"

    names = "; ".join(described(r) for r in stuck)
    one = len(stuck) == 1
    return (f"**Not learned at this budget.** {names}: {'its' if one else 'their'} test accuracy is within "
            f"{CHANCE_POINTS:g} points of chance ({_pct(1 / num_classes)}, one class in {num_classes}), or "
            f"{'its' if one else 'their'} cross-entropy within {100 * CHANCE_LOSS_SHARE:g} % of ln {num_classes} = "
            f"{uniform:.2f}, the loss of a "
            f"uniform guess. {'This model has' if one else 'These models have'} not learned to classify at this "
            f"budget, and {'its figure says' if one else 'their figures say'} nothing yet about what the method "
            f"can do. {remedy}")


REMEDIES = {
    "classification": "More epochs or more training images would change that: a larger profile, or "
                      "`fmnist-book run classification --profile {profile} -p epochs N -p train_images N` "
                      "(`train_images` 0 = all of them).",
    "semisupervised": "More epochs, more training images or more labels would change that: a larger profile, or "
                      "`fmnist-book run semisupervised --profile {profile}` with `-p epochs N`, "
                      "`-p train_images N` or `-p label_counts [...]`.",
    "fixmatch": "More optimiser steps or more labels would change that: a larger profile, or "
                "`fmnist-book run fixmatch --profile {profile}` with `-p steps N` or `-p label_counts [...]`.",
}


def remedy(experiment: str, profile: str) -> str:
    """What would make the runs of ``experiment`` learn, with the command for ``profile`` (:data:`REMEDIES`)."""
    return REMEDIES[experiment].format(profile=profile)


def gain_phrase(gain: float, std: float | None, seeds: int) -> str:
    """A difference of accuracies in words, conditional on the seeds' noise.

    Parameters
    ----------
    gain : float
        Accuracy of the method minus that of its baseline, as a fraction (0.05 = 5 points).
    std : float or None
        The seed standard deviation of that difference (or the larger of the two methods'), as a fraction.
    seeds : int
        Seeds behind each mean.

    Returns
    -------
    str
        "a gain of +8.1 points, more than 2 seed standard deviations (2 × 1.2 points)", "no measurable gain:
        +0.4 points, within 2 seed standard deviations (2 × 1.5 points)", or, with one seed, "a difference of
        +3.0 points from one seed, whose noise this build does not measure".
    """
    points = 100 * gain
    if seeds < 2 or std is None or not math.isfinite(std):
        return f"a difference of {points:+.1f} points from one seed, whose noise this build does not measure"
    band = f"{NOISE_STDS:g} seed standard deviations ({NOISE_STDS:g} × {100 * std:.1f} points)"
    if abs(gain) < NOISE_STDS * std:
        return f"no measurable gain: {points:+.1f} points, within {band}"
    kind = "a gain" if gain > 0 else "a loss"
    return f"{kind} of {points:+.1f} points, more than {band}"


def show(markdown: str) -> None:
    """Display ``markdown`` as the notebook cell's output (nothing when it is empty)."""
    if markdown:
        from IPython.display import Markdown, display
        display(Markdown(markdown))
