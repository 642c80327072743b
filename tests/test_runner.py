"""The runner and CLI: refusals before any work, cache keys, the results table, failures recorded."""
import json

import pytest

from fmnist_core.pipeline import cli
from fmnist_core.pipeline import runner
from fmnist_core.core.errors import ConfigError, RunError


def run_cli(capsys, *argv):
    code = cli.main(list(argv))
    captured = capsys.readouterr()
    return code, captured.out, captured.err


@pytest.mark.parametrize("argv, message", [
    (["run", "clasification"], "did you mean 'classification'"),
    (["run", "../etc"], "unknown experiment '../etc'"),
    (["run", "/tmp/x"], "unknown experiment '/tmp/x'"),
    (["run", "dataset", "--profile", "../../tmp"], "unknown profile"),
    (["run", "classification", "-p", "epochs", "zero"], "'epochs' must be int"),
    (["run", "classification", "-p", "epochs", "-1"], "'epochs' must be at least 1"),
    (["run", "classification", "-p", "learning_rate", "0.1"], "unknown parameter 'learning_rate'"),
    (["run", "classification", "-p", "epochs", "1", "-p", "epochs", "2"], "given twice"),
    (["results", "--profile", "nope"], "unknown profile 'nope'"),
])
def test_bad_input_is_refused_with_one_message_and_nothing_written(tmp_path, capsys, argv, message):
    results = tmp_path / "results"
    code, _, err = run_cli(capsys, "--results-dir", str(results), *argv)
    assert code == 2
    assert message in err and err.startswith("error: ") and "Traceback" not in err
    assert not results.exists()


def test_run_key_follows_parameters_and_source(tmp_path):
    params = runner.resolve_params("dataset", "smoke")
    key = runner.run_key("dataset", "smoke", params, tmp_path)
    assert key == runner.run_key("dataset", "smoke", dict(params), tmp_path)
    assert key != runner.run_key("dataset", "smoke", {**params, "seed": 1}, tmp_path)
    assert key != runner.run_key("dataset", "quick", params, tmp_path)


def test_the_settings_of_the_profiles_a_page_describes_are_in_its_key(tmp_path, monkeypatch):
    def described(experiment, paper_steps):
        real = runner.get_profile
        def patched(name, profiles=None):
            profile = real(name, profiles)
            if name != "paper":
                return profile
            fixmatch = {**profile["experiments"]["fixmatch"], "steps": paper_steps}
            return {**profile, "experiments": {**profile["experiments"], "fixmatch": fixmatch}}
        monkeypatch.setattr(runner, "get_profile", patched)
        parts = runner.key_parts(experiment, "smoke", runner.resolve_params(experiment, "smoke"), tmp_path)
        monkeypatch.setattr(runner, "get_profile", real)
        return parts
    before, after = described("fixmatch", 2 ** 20), described("fixmatch", 2 ** 19)
    assert set(before["described"]) == {"standard", "paper"}
    assert before["described"]["standard"] == after["described"]["standard"]
    assert runner.changed_parts(before, after) == ["paper profile's settings"]
    assert described("dataset", 2 ** 20)["described"] == {}  # a page that quotes no other profile


def test_run_key_covers_only_the_modules_an_experiment_uses(tmp_path):
    def sources(experiment):
        return set(runner.key_parts(experiment, "smoke", runner.resolve_params(experiment, "smoke"),
                                    tmp_path)["sources"])
    assert "fmnist_core/chapters/dataset.py" in sources("dataset")
    assert "fmnist_core/core/models.py" not in sources("dataset")
    assert {"fmnist_core/core/models.py", "fmnist_core/core/loop.py"} <= sources("classification")


def test_a_rerun_carries_the_finished_jobs_of_the_previous_run(tmp_path):
    final, partial = tmp_path / "exp", tmp_path / "exp.partial"
    (final / "models" / "done").mkdir(parents=True)
    (final / "models" / "done" / "done.json").write_text("{}")
    (final / "models" / "done" / "best.pt").write_bytes(b"weights")
    (final / "models" / "unfinished").mkdir()
    (final / "models" / "unfinished" / "last.pt").write_bytes(b"resume state")
    assert runner.carry_finished_jobs(final, partial) == 1
    assert (partial / "models" / "done" / "best.pt").read_bytes() == b"weights"
    assert not (partial / "models" / "unfinished").exists()
    assert runner.carry_finished_jobs(final, partial) == 0  # what the new run already has is kept


def test_overrides_beat_the_profile():
    assert runner.resolve_params("classification", "smoke", {"epochs": 2})["epochs"] == 2
    assert runner.resolve_params("classification", "smoke")["epochs"] == 1


def test_concurrent_runs_of_one_experiment_are_refused(tmp_path):
    with runner.run_lock(tmp_path, "smoke", "dataset"):
        with pytest.raises(RunError, match="in progress"):
            with runner.run_lock(tmp_path, "smoke", "dataset"):
                pass
        with runner.run_lock(tmp_path, "smoke", "classification"):  # another experiment is fine
            pass


def test_failure_is_recorded_and_old_results_are_kept(tmp_path, monkeypatch):
    finished = tmp_path / "smoke" / "dataset"
    finished.mkdir(parents=True)
    (finished / "metrics.json").write_text('{"summary": []}')
    (finished / "env.json").write_text(json.dumps({"key": "old"}))

    def explode(*args, **kwargs):
        raise RuntimeError("kernel died")
    monkeypatch.setattr(runner, "execute_notebook", explode)
    result = runner.run_experiment("dataset", "smoke", results_dir=tmp_path, log=lambda *_: None)
    assert result.status == "failed" and "kernel died" in result.error
    failure = json.loads(runner.failure_path(finished).read_text())
    assert failure["rerun"] == "fmnist-book run dataset --profile smoke"
    assert json.loads((finished / "env.json").read_text())["key"] == "old"  # untouched
    assert "FAILED" in runner.results_table("smoke", tmp_path)


def test_results_table_reads_summary_rows(tmp_path):
    run_dir = tmp_path / "smoke" / "classification"
    run_dir.mkdir(parents=True)
    (run_dir / "env.json").write_text(json.dumps({"key": "k"}))
    (run_dir / "metrics.json").write_text(json.dumps({"summary": [
        {"run": "lenet_avg", "accuracy": 0.8912, "parameters": 61706}]}))
    (run_dir / "timings.json").write_text(json.dumps({"lenet_avg": {"train_s": 35.04}}))
    table = runner.results_table("smoke", tmp_path)
    assert "lenet_avg" in table and "0.8912" in table and "61,706" in table and "35.0" in table
    assert "dataset: not run" in table


def test_profile_names_cannot_escape():
    for name in ("../quick", "/etc", "quick/../smoke"):
        with pytest.raises(ConfigError):
            runner.get_profile(name)


@pytest.mark.parametrize("new_run_finished", [True, False])
def test_a_kill_between_the_renames_of_a_swap_is_repaired(tmp_path, new_run_finished):
    final = tmp_path / "smoke" / "dataset"
    old, partial = final.with_name("dataset.old"), final.with_name("dataset.partial")
    old.mkdir(parents=True)
    (old / "env.json").write_text(json.dumps({"key": "previous"}))
    partial.mkdir()
    if new_run_finished:
        (partial / "env.json").write_text(json.dumps({"key": "new"}))
    runner.recover_interrupted_swap(final)
    assert runner.finished_key(final) == ("new" if new_run_finished else "previous")
    assert not old.exists()


def test_a_notebook_runs_in_its_run_folder_and_leaves_the_process_where_it_is(tmp_path, monkeypatch):
    """Notebooks run side by side in threads: papermill's `cwd` would move the whole process under them."""
    import os

    import nbformat
    probe = tmp_path / "probe.ipynb"
    nbformat.write(nbformat.v4.new_notebook(cells=[nbformat.v4.new_code_cell(
        "import os, pathlib\npathlib.Path('cwd.txt').write_text(os.getcwd())")], metadata={
        "kernelspec": {"name": "python3", "language": "python", "display_name": "Python 3"},
        "language_info": {"name": "python"}}), probe)
    monkeypatch.setattr(runner, "notebook_path", lambda experiment: probe)
    moves, chdir = [], os.chdir
    monkeypatch.setattr(os, "chdir", lambda path: (moves.append(path), chdir(path)))
    run_dir, before = tmp_path / "probe.partial", os.getcwd()
    run_dir.mkdir()
    runner.execute_notebook("probe", "smoke", {}, run_dir, tmp_path, None)
    assert (run_dir / "cwd.txt").read_text() == str(run_dir.resolve())
    assert set(moves) <= {before} and os.getcwd() == before  # papermill returns to where it started, always
