"""batchnorm fold | doctor | recalibrate: what they write and print (the failure cases are in tests/faults)."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from tolerances import REL_TOL, assert_rel_close

from batchnorm import reference as R
from batchnorm.tools.cli import run as main
from batchnorm.tools.fold import fold_batchnorm

from .models import convnet

F32 = REL_TOL[torch.float32]
MODEL = "tests.tools.models:convnet"
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))


@pytest.fixture
def sd_file(tmp_path):
    path = tmp_path / "sd.pt"
    torch.save(convnet().state_dict(), path)
    return str(path)


def test_fold_writes_a_loadable_folded_state_dict(tmp_path, sd_file, capsys):
    out, rep = tmp_path / "folded.pt", tmp_path / "fold.json"
    argv = ["fold", MODEL, "--state-dict", sd_file, "--input-shape", "2,3,16,16", "--output", str(out), "--json",
            str(rep)]  # fmt: skip
    assert main(argv) == 0
    assert "4 of 4 batch norm(s) folded" in capsys.readouterr().out
    assert len(json.loads(rep.read_text())["folded"]) == 4
    model = convnet()
    folded, _ = fold_batchnorm(convnet(), torch.randn(2, 3, 16, 16))
    folded.load_state_dict(torch.load(out, weights_only=True))
    x = torch.randn(2, 3, 16, 16)
    with torch.no_grad():
        expected = model.double()(x.double())
        assert_rel_close(folded(x), expected, F32, "folded from file")


def test_recalibrate_from_data_file(tmp_path, capsys):
    torch.manual_seed(0)
    data = torch.randn(40, 3, 16, 16) * 2 + 1
    data_file, out = tmp_path / "data.pt", tmp_path / "recal.pt"
    torch.save(data, data_file)
    argv = ["recalibrate", MODEL, "--data", str(data_file), "--batch-size", "16", "--num-batches", "2",
            "--output", str(out), "--quiet"]  # fmt: skip
    assert main(argv) == 0
    sd = torch.load(out, weights_only=True)
    model = convnet()
    with torch.no_grad():
        z = model.features[0](data[:32]).double().numpy()  # 2 batches of 16: the first BN's input
    st = R.moments(z, (0, 2, 3))
    assert_rel_close(sd["features.1.running_mean"], st.mean, F32, "running_mean")
    assert_rel_close(sd["features.1.running_var"], st.var_unbiased, F32, "running_var")
    assert int(sd["features.1.num_batches_tracked"]) == 10 + 2
    assert "features.1: 8192 values per channel" in capsys.readouterr().out


def test_recalibrate_synthetic_warns(tmp_path, capsys):
    out = tmp_path / "r.pt"
    assert main(["recalibrate", MODEL, "--synthetic", "8,3,16,16", "--num-batches", "2", "--output", str(out)]) == 0
    assert "warning: recalibrating on random" in capsys.readouterr().err and out.exists()
    assert int(torch.load(out, weights_only=True)["features.1.num_batches_tracked"]) == 10 + 2


def test_recalibrate_from_a_saved_tensor_dataset(tmp_path, capsys):
    from torch.utils.data import TensorDataset

    data = torch.randn(40, 3, 16, 16)
    torch.save(TensorDataset(data, torch.arange(40)), tmp_path / "ds.pt")
    out = tmp_path / "r.pt"
    assert main(["recalibrate", MODEL, "--data", str(tmp_path / "ds.pt"), "--batch-size", "20", "--output", str(out),
                 "--quiet"]) == 0  # fmt: skip
    assert "features.1: 10240 values per channel" in capsys.readouterr().out  # 40 x 16 x 16


def test_fold_without_an_example_keeps_the_linear_neighbours(capsys):
    assert main(["fold", MODEL]) == 0
    out = capsys.readouterr().out
    assert "2 of 4 batch norm(s) folded" in out and "pass example_input= (or --input-shape)" in out


def test_doctor_prints_and_writes_json(tmp_path, sd_file, capsys):
    x_file, js = tmp_path / "x.pt", tmp_path / "doc.json"
    torch.save(torch.randn(4, 3, 16, 16), x_file)
    assert main(["doctor", MODEL, "--state-dict", sd_file, "--input", str(x_file), "--json", str(js)]) == 0
    text = capsys.readouterr().out
    assert "features.1" in text and "small_batch" in text
    data = json.loads(js.read_text())
    assert data["example_shape"] == [4, 3, 16, 16] and len(data["layers"]) == 4


def test_python_m_batchnorm_runs_the_tools():
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run([sys.executable, "-m", "batchnorm", "fold", MODEL, "--input-shape", "2,3,16,16"],
                          capture_output=True, text=True, env=env, cwd=ROOT, timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "4 of 4 batch norm(s) folded" in proc.stdout
