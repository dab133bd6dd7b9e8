"""batchnorm fold | doctor | recalibrate: outputs, exit status 2 on bad files, nothing written on error."""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest
import torch
from tolerances import REL_TOL, assert_rel_close

from batchnorm import reference as R
from batchnorm.tools.cli import main
from batchnorm.tools.fold import fold_batchnorm

from .models import convnet, other_model

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
    assert main(["fold", MODEL, "--state-dict", sd_file, "--output", str(out), "--json", str(rep)]) == 0
    assert "4 of 4 batch norm(s) folded" in capsys.readouterr().out
    assert len(json.loads(rep.read_text())["folded"]) == 4
    model = convnet()
    folded, _ = fold_batchnorm(convnet())
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


def test_doctor_prints_and_writes_json(tmp_path, sd_file, capsys):
    x_file, js = tmp_path / "x.pt", tmp_path / "doc.json"
    torch.save(torch.randn(4, 3, 16, 16), x_file)
    assert main(["doctor", MODEL, "--state-dict", sd_file, "--input", str(x_file), "--json", str(js)]) == 0
    text = capsys.readouterr().out
    assert "features.1" in text and "small_batch" in text
    data = json.loads(js.read_text())
    assert data["example_shape"] == [4, 3, 16, 16] and len(data["layers"]) == 4


class _Evil:  # a pickled object that weights_only loading must refuse
    def __reduce__(self):
        return (os.system, ("echo pwned",))


def _bad_file(kind, tmp_path, sd_file):
    path = tmp_path / f"{kind}.pt"
    if kind == "missing":
        return str(path)
    if kind == "truncated":
        path.write_bytes(open(sd_file, "rb").read()[:200])
    elif kind == "not a state_dict":
        torch.save([1, 2, 3], path)
    elif kind == "mismatched":
        torch.save(other_model().state_dict(), path)
    elif kind == "pickled object":
        torch.save({"x": _Evil()}, path)
    return str(path)


@pytest.mark.parametrize("kind", ["missing", "truncated", "not a state_dict", "mismatched", "pickled object"])
@pytest.mark.parametrize("command", ["fold", "recalibrate"])
def test_bad_state_dict_exit_2_and_nothing_written(kind, command, tmp_path, sd_file, capsys):
    bad = _bad_file(kind, tmp_path, sd_file)
    out = tmp_path / "out.pt"
    out.write_bytes(b"previous contents")
    extra = ["--synthetic", "4,3,16,16", "--quiet"] if command == "recalibrate" else []
    rc = main([command, MODEL, "--state-dict", bad, "--output", str(out)] + extra)
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2
    assert len([e for e in err if "error:" in e]) == 1 and err[-1].startswith(f"batchnorm {command}: error:")
    assert out.read_bytes() == b"previous contents"
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []  # no temp files left


@pytest.mark.parametrize(
    "spec,match",
    [("nocolon", "package.module:factory"), ("no_such_mod_xyz:f", "cannot import"),
     ("tests.tools.models:missing", "no attribute"), ("tests.tools.models:broken_factory", "raised RuntimeError")],
)  # fmt: skip
def test_bad_model_spec_exit_2(spec, match, capsys):
    assert main(["doctor", spec, "--input-shape", "2,3,16,16"]) == 2
    assert match in capsys.readouterr().err


def test_failed_recalibration_writes_nothing(tmp_path, capsys):
    data = tmp_path / "d.pt"
    torch.save(torch.randn(8, 5, 16, 16), data)  # 5 channels: the model takes 3
    out = tmp_path / "o.pt"
    assert main(["recalibrate", MODEL, "--data", str(data), "--output", str(out), "--quiet"]) == 2
    assert "recalibration failed, nothing written" in capsys.readouterr().err and not out.exists()


def test_registered_in_the_batchnorm_command():
    env = {**os.environ, "PYTHONPATH": ROOT + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.run([sys.executable, "-m", "batchnorm.cli", "fold", MODEL], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=120)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert "4 of 4 batch norm(s) folded" in proc.stdout
