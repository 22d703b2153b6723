"""`sgf-dmft simulate`: output files and every input-error path (exit 2, one line, no traceback).

Budget: about 5 s (one real subprocess of the console script; everything else in-process).
"""
import csv
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from solver import __version__
from solver.cli import main

HEADER = ("t,epochs,train_loss,test_loss,test_error,m,Q,"
          "train_loss_se,test_loss_se,test_error_se,m_se,Q_se").split(",")
SMALL = ["--d", "40", "--T", "0.2", "--dt", "0.05", "--seeds", "2"]


def read_csv(path):
    with open(path, newline="") as fh:
        rows = list(csv.reader(fh))
    return rows[0], rows[1:]


def test_simulate_regression_csv_and_sidecar(tmp_path, capsys):
    out = tmp_path / "x.csv"
    rc = main(["simulate", "--loss", "square", "--teacher", "linear", "--algo", "sgf", *SMALL,
               "--quiet", "--out", str(out)])
    assert rc == 0
    header, rows = read_csv(out)
    # the shared columns, exactly, then the GLM's cosine and its standard error
    assert header == HEADER + ["cosine", "cosine_se"]
    assert len(rows) == 5
    col = {k: i for i, k in enumerate(header)}
    for r in rows:
        assert r[col["test_error"]] == "" and r[col["test_error_se"]] == ""  # regression
        for k in ("t", "epochs", "train_loss", "test_loss", "m", "Q", "m_se", "Q_se"):
            float(r[col[k]])
    assert [float(r[0]) for r in rows] == pytest.approx([0, 0.05, 0.1, 0.15, 0.2])
    side = json.loads(out.with_suffix(".json").read_text())
    assert side["version"] == __version__ and side["engine"] == "sim-sgf"
    assert side["config"]["loss"] == "square" and side["config"]["d"] == 40
    assert side["status"] == "ok"
    assert capsys.readouterr().err == ""


def console_script():
    exe = Path(sys.executable).with_name("sgf-dmft")
    return str(exe) if exe.exists() else shutil.which("sgf-dmft")


def test_console_script_subprocess(tmp_path):
    exe = console_script()
    if exe is None:
        pytest.fail("console script sgf-dmft not installed (pip install -e .)")
    out = tmp_path / "y.csv"
    p = subprocess.run([exe, "simulate", "--algo", "sgd", "--batch", "4", *SMALL, "--quiet",
                        "--out", str(out)], capture_output=True, text=True, timeout=300)
    assert p.returncode == 0, p.stderr
    header, rows = read_csv(out)
    assert header[:12] == HEADER and len(rows) == 5
    col = header.index("test_error")
    assert all(0.0 <= float(r[col]) <= 1.0 for r in rows)  # classification (default sign teacher)
    assert json.loads(out.with_suffix(".json").read_text())["engine"] == "sim-sgd"
    # and an error path through the real entry point
    p = subprocess.run([exe, "simulate", "--tau", "nan", "--out", str(out)],
                       capture_output=True, text=True, timeout=300)
    assert p.returncode == 2 and len(p.stderr.strip().splitlines()) == 1
    assert "tau" in p.stderr and "Traceback" not in p.stderr


@pytest.mark.parametrize("args,name", [
    (["--d", "1"], "d"),                                   # out of range
    (["--delta", "-1"], "delta"),                          # out of range
    (["--tau", "abc"], "tau"),                             # not a number
    (["--seeds", "2.5"], "seeds"),                         # not an integer
    (["--tau", "nan"], "tau"),                             # NaN
    (["--T", "inf"], "T"),                                 # inf
    (["--lam", "-inf"], "lam"),                            # -inf
    (["--loss", "hinge"], "loss"),                         # unknown choice
    (["--algo", "adam"], "algo"),                          # unknown choice
    (["--tau", "1", "--eta", "3", "--batch", "1"], "eta"),  # contradictory tau / eta
    (["--q0", "0.1", "--m0", "1"], "m0"),                  # m0^2 > q0 rho
    (["--algo", "sgd", "--d", "100", "--batch", "500"], "batch"),  # batch > n
    (["--loss", "logistic", "--teacher", "linear"], "loss"),  # logistic needs +-1 labels
    ("no-out", "out"),                                     # missing --out
    ("bad-dir", "out"),                                    # output directory does not exist
])
def test_error_paths(tmp_path, capsys, args, name):
    out = ["--out", str(tmp_path / "x.csv")]
    if args == "no-out":
        args, out = [], []
    elif args == "bad-dir":
        args, out = [], ["--out", str(tmp_path / "missing" / "x.csv")]
    rc = main(["simulate", *args, *out])
    err = capsys.readouterr().err
    assert rc == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert "Traceback" not in err
    assert name in lines[0] and lines[0].startswith("sgf-dmft: error:")
    assert not (tmp_path / "x.csv").exists()
