"""tests/forkserver.py, through which most tests run their `python -m` commands: it answers as a fresh process
would, stops a command at its timeout and goes on serving, and leaves to a process of its own a command whose
import-time settings differ from the server's."""
import os
import subprocess

import pytest

from forkserver import SERVER_ENV, python_m

ENV = {**os.environ, **SERVER_ENV}


def forked_or_skip(r):
    """Skip where the server is meant to stand aside (FAIRSYNTH_TEST_FORK=0, a GPU, no fork); anywhere else a command
    it did not run is a failure."""
    from common.stage_server import FORK, GPU_NODE
    if any(os.environ.get(k) == "0" for k in ("FAIRSYNTH_TEST_FORK", FORK)) or os.path.exists(GPU_NODE) or \
            not hasattr(os, "fork"):
        pytest.skip("the fork server stands aside here")
    assert r.forked, "the fork server started a process of its own: a thread in the server, or an import error?"
    return r


@pytest.mark.parametrize("args", [["classify.train_classifier", "--epochs"], ["vae.skintone_study", "--repeats", "0"],
                                  ["classify.chestxray_study", "--female-fraction", "1.5"],
                                  ["classify.train_chexnet", "--help"], ["common.download", "nope"]],
                         ids=lambda a: " ".join(a))
def test_the_server_answers_as_a_fresh_process(args, tmp_path, monkeypatch):
    """The same status, stdout and stderr as a process of its own, for refusals from argparse and from the scripts'
    checks, and for a help text."""
    env = {**ENV, "FAIRSYNTH_CACHE": str(tmp_path / "cache")}
    forked = forked_or_skip(python_m(args[0], args[1:], env=env))
    monkeypatch.setenv("FAIRSYNTH_TEST_FORK", "0")
    fresh = python_m(args[0], args[1:], env=env)
    assert (forked.returncode, forked.stdout, forked.stderr) == (fresh.returncode, fresh.stdout, fresh.stderr)
    assert not fresh.forked and forked.stdout + forked.stderr


def test_a_command_past_its_timeout_is_stopped_and_the_server_goes_on():
    forked_or_skip(python_m("json.tool", ["--help"], env=ENV))
    with pytest.raises(subprocess.TimeoutExpired):
        python_m("timeit", ["-n", "1000000000", "pass"], env=ENV, timeout=1)
    r = python_m("json.tool", ["--help"], env=ENV)
    assert r.forked and r.returncode == 0 and "usage" in r.stdout


def test_other_import_time_settings_start_a_process_of_their_own():
    r = python_m("json.tool", ["--help"], env={**ENV, "OMP_NUM_THREADS": "2"})
    assert not r.forked and r.returncode == 0 and "usage" in r.stdout
    r = python_m("json.tool", ["--help"], env={**ENV, "PYTHONWARNINGS": "error"})
    assert not r.forked and r.returncode == 0


def test_variables_libraries_set_for_themselves_do_not_turn_the_server_off():
    """scikit-learn and torch's compiler add variables to the environment when imported (KMP_*, TORCHINDUCTOR_*): an
    environment taken before a test imported them must still be served (in a CI run it was not, and the suite's
    commands started processes)."""
    env = dict(ENV)
    import sklearn  # noqa: F401
    import torch._inductor.config  # noqa: F401
    forked_or_skip(python_m("json.tool", ["--help"], env=env))
