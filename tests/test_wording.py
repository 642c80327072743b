"""Page sentences conditional on their numbers: models at chance are called so, gains within the noise are
"no measurable gain", the weak translation is stated as the code does it."""
import math

import pytest

from fmnist_core.chapters.classification import chance_note as classification_note
from fmnist_core.chapters.fixmatch import study as fixmatch
from fmnist_core.chapters.fixmatch.algorithm import weak_pad
from fmnist_core.core import wording
from fmnist_core.core.wording import RunScore, at_chance, chance_note, gain_phrase


def test_a_run_is_at_chance_by_its_accuracy_or_by_a_cross_entropy_near_ln_classes():
    assert at_chance(0.10, 10) and at_chance(0.149, 10)
    assert not at_chance(0.151, 10) and not at_chance(0.90, 10, loss=0.3)
    assert at_chance(0.236, 10, loss=2.33)  # above chance by accuracy, but a uniform guess by its loss
    assert not at_chance(0.50, 10, loss=2.18) and not at_chance(0.5, 10, loss=float("nan"))
    assert at_chance(0.52, 2) and not at_chance(0.60, 2, loss=0.4)
    with pytest.raises(ValueError, match="accuracy must be in \\[0, 1\\], got 23.6"):
        at_chance(23.6, 10)
    with pytest.raises(ValueError, match="num_classes must be at least 2"):
        at_chance(0.5, 1)


def test_the_chance_note_names_only_the_runs_at_chance_and_says_what_would_change_that():
    runs = [RunScore("m2 @ 100 labels", 0.236, 2.33), RunScore("cnn @ 100 labels", 0.61, 1.2)]
    note = chance_note(runs, 10, wording.remedy("semisupervised", "quick"))
    assert note.startswith("**Not learned at this budget.** m2 @ 100 labels (23.6 %, cross-entropy 2.33): its ")
    assert "cnn" not in note
    assert "ln 10 = 2.30" in note and "chance (10.0 %" in note and "This model has not learned" in note
    assert "`fmnist-book run semisupervised --profile quick`" in note and "-p epochs N" in note
    assert chance_note(runs[1:], 10, "more epochs") == ""
    assert "These models have" in chance_note([RunScore("a", 0.1), RunScore("b", 0.12)], 10, "x")


def test_the_classification_note_reads_accuracy_and_test_cross_entropy():
    summaries = {"mlp": {"accuracy": 0.85, "log_loss": 0.4}, "lenet_avg": {"accuracy": 0.23, "log_loss": 2.27}}
    note = classification_note(summaries, ["mlp", "lenet_avg"], 10, "smoke")
    assert "lenet_avg (23.0 %, cross-entropy 2.27)" in note and "mlp" not in note
    assert "--profile smoke -p epochs N -p train_images N" in note


@pytest.mark.parametrize("gain, std, seeds, words", [
    (0.004, 0.015, 4, "no measurable gain: +0.4 points, within 2 seed standard deviations (2 × 1.5 points)"),
    (-0.02, 0.015, 4, "no measurable gain: -2.0 points, within 2 seed standard deviations (2 × 1.5 points)"),
    (0.081, 0.012, 4, "a gain of +8.1 points, more than 2 seed standard deviations (2 × 1.2 points)"),
    (-0.05, 0.01, 3, "a loss of -5.0 points, more than 2 seed standard deviations (2 × 1.0 points)"),
    (0.03, None, 1, "a difference of +3.0 points from one seed, whose noise this build does not measure"),
])
def test_a_gain_is_called_measurable_only_beyond_two_seed_standard_deviations(gain, std, seeds, words):
    assert gain_phrase(gain, std, seeds) == words


def rows(fixmatch_acc, baseline_acc):
    return ([{"method": "fixmatch", "num_labels": 40, "seed": s, "test_accuracy": a}
             for s, a in enumerate(fixmatch_acc)] +
            [{"method": "supervised-only", "num_labels": 40, "seed": s, "test_accuracy": a}
             for s, a in enumerate(baseline_acc)] +
            [{"method": "fixmatch", "num_labels": 250, "seed": 0, "test_accuracy": 0.9}])


def test_the_fixmatch_gain_is_paired_by_seed_and_worded_by_its_noise():
    # Seed differences +4, -3, +2 points: mean +1 point, standard deviation 3.6 points: within the noise.
    sub_noise = rows([0.54, 0.47, 0.52], [0.50, 0.50, 0.50])
    gain, std, seeds = fixmatch.paired_gain(sub_noise, 40)
    assert seeds == 3 and gain == pytest.approx(0.01) and std == pytest.approx(math.sqrt(0.0013))
    assert fixmatch.gain_words(sub_noise, 40).startswith("no measurable gain: +1.0 points")
    # The same labeled subsets gain 10 +- 1 points on every seed: measurable.
    assert fixmatch.gain_words(rows([0.60, 0.61, 0.59], [0.50, 0.50, 0.50]), 40).startswith("a gain of +10.0 points")
    assert "from one seed" in fixmatch.gain_words(rows([0.6], [0.5]), 40)
    with pytest.raises(Exception, match="no seed has both fixmatch and supervised-only at 250 labels"):
        fixmatch.paired_gain(sub_noise, 250)


def test_the_weak_translation_is_stated_as_the_code_does_it():
    assert weak_pad(28) == 3 and weak_pad(32) == 4
    assert fixmatch.weak_translation(28) == "3 pixels (10.7 % of the 28-pixel side)"
    assert fixmatch.weak_translation(32) == "4 pixels (12.5 % of the 32-pixel side)"


def test_the_semisup_vae_loss_sentence_comes_from_the_runs_logged_terms(tmp_path):
    from fmnist_core.chapters.semisupervised import study
    from fmnist_core.core.io import write_json
    run = tmp_path / "models" / "semisup_vae_n100_s0"
    write_json(run / "history.json", [{"train_recon": 1.0, "train_kl": 1.0, "train_classification": 9.0},
                                      {"train_recon": 606.6, "train_kl": 146.9, "train_classification": 2.071,
                                       "val_loss": 2.2}])
    write_json(run / "metrics.json", {"classification_weight": 784.0})
    note = study.loss_terms_note(tmp_path, "semisup_vae_n100_s0", 1.0)
    assert "reconstruction 606.6 (26 %), KL 146.9 (6 %), weighted cross-entropy 1,623.7 (68 %)" in note
    assert note.endswith("the weighted cross-entropy term dominates it.")
    write_json(run / "metrics.json", {"classification_weight": 100.0})
    assert study.loss_terms_note(tmp_path, "semisup_vae_n100_s0", 1.0).endswith("the reconstruction term dominates it.")
    write_json(run / "metrics.json", {"classification_weight": 200.0})  # 400 + 300 + 300: none above half
    write_json(run / "history.json", [{"train_recon": 400.0, "train_kl": 300.0, "train_classification": 1.5}])
    assert study.loss_terms_note(tmp_path, "semisup_vae_n100_s0", 1.0).endswith("no single term makes up half of it.")
