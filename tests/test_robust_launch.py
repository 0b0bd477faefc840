"""Robustness of the launch path: submit's time limits, and torchrun.sh's last word on bad input."""

from __future__ import annotations

import subprocess
import sys

import pytest

from afb_scale import submit
from afb_scale.config import ConfigError
from launch_support import REPO, job_env

EXAMPLE = REPO / "configs" / "cluster" / "example.yaml"
TORCHRUN_SH = REPO / "launch" / "torchrun.sh"
TIME_FORMATS = "use M, M:S, H:M:S, D-H, D-H:M or D-H:M:S"


# ----------------------------------------------------------------------------------------------
# A. Slurm time limits


@pytest.mark.parametrize("value, problem", [
    ("25:99:99", "minutes 99 is out of range 0-59"),
    ("1:00:60", "seconds 60 is out of range 0-59"),
    ("90:60", "seconds 60 is out of range 0-59"),
    ("1-24", "hours 24 is out of range 0-23"),
    ("2-23:60", "minutes 60 is out of range 0-59"),
    ("0-1:00:75", "seconds 75 is out of range 0-59"),
])
def test_out_of_range_time_fields_are_rejected(value, problem):
    with pytest.raises(ConfigError) as e:
        submit.load_job(EXAMPLE, [f"time={value}"])
    msg = str(e.value)
    assert msg.startswith(f"time={value!r} is not a Slurm time limit: {problem}"), msg
    assert TIME_FORMATS in msg and "\n" not in msg


@pytest.mark.parametrize("value", ["1 hour", "1:2:3:4", "2-", "-5", "1h", "UNLIMITED", ""])
def test_malformed_times_are_rejected(value):
    with pytest.raises(ConfigError) as e:
        submit.load_job(EXAMPLE, [f"time={value}"])
    assert f"time={value!r} is not a Slurm time limit; {TIME_FORMATS}" in str(e.value)


@pytest.mark.parametrize("value", ["90", "30:00", "1:30:00", "12:00:00", "100:59:59", "2-0", "1-23",
                                   "1-23:59", "0-00:30:59", "7-00:00:00", "'1:30:00'"])
def test_every_slurm_time_format_renders_as_typed(value):
    """Valid limits pass, and reach #SBATCH --time as typed: YAML would read an unquoted 1:30:00
    as the number 5400 (base 60), which is not what the user wrote."""
    cfg = submit.load_job(EXAMPLE, [f"time={value}"])
    assert cfg.time == value.strip("'")
    assert f"#SBATCH --time={value.strip(chr(39))}\n" in submit.render(cfg, REPO)


def test_an_unquoted_time_in_a_config_file_is_an_error_not_seconds(tmp_path):
    cfg = tmp_path / "job.yaml"
    cfg.write_text(f"include: [{EXAMPLE}]\ntime: 4:00:00\n")
    with pytest.raises(ConfigError) as e:
        submit.load_job(cfg, [])
    assert "time=14400" in str(e.value) and 'quote it, e.g. time: "04:00:00"' in str(e.value)


def test_submit_main_rejects_a_bad_time_in_one_line_and_writes_nothing(tmp_path, capsys):
    rc = submit.main([str(EXAMPLE), "time=25:99:99", f"log_dir={tmp_path}/logs", "--repo", str(REPO)])
    assert rc == 2
    cap = capsys.readouterr()
    err = cap.err.strip()
    assert err.startswith("afb-scale submit: error: time='25:99:99' is not a Slurm time limit"), err
    assert "\n" not in err and "Traceback" not in err and cap.out == ""
    assert not (tmp_path / "logs").exists()
