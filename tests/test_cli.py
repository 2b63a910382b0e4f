"""The command line: each subcommand's options, messages in the command line's words, what is printed when."""

import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import gmcompress as gm
import gmcompress.api
import gmcompress.training
from gmcompress.cli import main

REPO_ROOT = Path(__file__).resolve().parent.parent
MLP = ["--model", "cli_models:mlp"]


def spy_on(monkeypatch, module, name):
    """Record the keyword arguments of every call of ``module.name`` (which still runs)."""
    calls = []
    real = getattr(module, name)

    def spy(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(module, name, spy)
    return calls


def test_help_does_not_import_torch():
    """``--help`` answers before anything heavy is imported (torch alone takes seconds to import)."""
    for argv in (["--help"], ["finetune", "--help"]):
        done = subprocess.run(
            [sys.executable, "-X", "importtime", "-m", "gmcompress.cli", *argv],
            cwd=REPO_ROOT, capture_output=True, text=True, timeout=120,
        )  # fmt: skip
        assert done.returncode == 0 and "usage: gmcompress" in done.stdout
        imported = [line.rsplit("|", 1)[-1].strip() for line in done.stderr.splitlines() if "|" in line]
        assert "gmcompress" in imported
        assert not [name for name in imported if re.match(r"(torch|numpy)(\.|$)", name)]


@pytest.mark.parametrize(
    "argv,option",
    [
        (["plan", *MLP, "--group", "C8", "--eval", "cli_models:neg_mse"], "--eval"),
        (["plan", *MLP, "--group", "C8", "--calibration-mode", "original"], "--calibration-mode"),
        (["report", *MLP, "--checkpoint", "m.pt", "--group", "C8"], "--group"),
        (["report", *MLP, "--checkpoint", "m.pt", "--recipe", "r.yaml"], "--recipe"),
        (["report", *MLP, "--checkpoint", "m.pt", "--calibration", "cli_models:example_inputs"], "--calibration"),
    ],
)
def test_each_subcommand_takes_only_its_options(argv, option, capsys):
    with pytest.raises(SystemExit) as exit_:
        main(argv)
    assert exit_.value.code == 2
    assert f"unrecognized arguments: {option}" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main([argv[0], "--help"])
    assert f"{option} " not in capsys.readouterr().out


@pytest.mark.parametrize("abbreviated,value", [("--grou", "C8"), ("--calibration-m", "original"), ("--no-cal", None)])
def test_options_are_not_abbreviated(abbreviated, value, capsys):
    """No prefix stands for an option (finetune's --calibration was once read as --calibration-mode)."""
    with pytest.raises(SystemExit):
        main(["compress", *MLP, "--group", "C8", abbreviated] + ([value] if value else []))
    assert f"unrecognized arguments: {abbreviated}" in capsys.readouterr().err


def test_finetune_takes_calibration_batches(monkeypatch, capsys):
    calls = spy_on(monkeypatch, gmcompress.api, "compress")
    argv = ["finetune", *MLP, "--group", "C8", "--epochs", "1", "--quiet"]
    assert main([*argv, "--calibration", "cli_models:example_inputs", "--calibration-mode", "original"]) == 0, (
        capsys.readouterr().err
    )
    import cli_models

    torch.testing.assert_close(calls[0]["calibration"], cli_models.example_inputs(), rtol=0, atol=0)
    assert calls[0]["calibration_mode"] == "original"
    assert main([*argv, "--no-calibration"]) == 0
    assert calls[1]["calibration"] is None


@pytest.fixture
def checkpoint(tmp_path):
    import cli_models

    path = tmp_path / "mlp.pt"
    gm.save(gm.compress(cli_models.build_mlp(), group="C8", progress=False), path)
    return path


@pytest.mark.parametrize(
    "extra,named",
    [
        (["--group", "C4"], "--group C4"),
        (["--rank", "2", "--conv-group", "C4"], "--rank 2, --conv-group C4"),
        (["--no-calibration"], "--no-calibration"),
        (["--calibration-mode", "original"], "--calibration-mode original"),
    ],
)
def test_finetune_from_a_checkpoint_refuses_compression_options(checkpoint, extra, named, capsys):
    argv = ["finetune", *MLP, "--checkpoint", str(checkpoint), "--epochs", "1", "--quiet"]
    assert main([*argv, *extra]) == 2
    err = capsys.readouterr().err
    assert err == (
        f"gmcompress: error: finetune --checkpoint {checkpoint} fine-tunes a model compressed already: {named} "
        "would be ignored; drop it, or drop --checkpoint to compress now\n"
    )


def test_a_missing_group_is_named_as_the_flag(capsys):
    for command in ("plan", "compress", "finetune"):
        assert main([command, *MLP] + (["--epochs", "1"] if command == "finetune" else [])) == 2
        assert capsys.readouterr().err == (
            f"gmcompress: error: {command} needs a group: give --group (e.g. --group C8) or --recipe FILE whose "
            "defaults or rules set one (see recipes/)\n"
        )
    import cli_models

    with pytest.raises(ValueError, match=re.escape("compress needs a group (e.g. group='C8')")):
        gm.plan(cli_models.build_mlp())  # Python callers keep the keyword's name


def test_model_from_a_file_in_the_current_directory(tmp_path, monkeypatch, capsys):
    """``--model mymodels:build`` finds ./mymodels.py, as ``python -m`` would (the ``gmcompress`` script puts
    the script's folder first on sys.path, not the current directory)."""
    (tmp_path / "cli_own_models.py").write_text(
        "import torch\n\ndef build():\n    return torch.nn.Sequential(torch.nn.Linear(16, 32))\n"
    )
    monkeypatch.chdir(tmp_path)
    monkeypatch.setattr(sys, "path", [p for p in sys.path if p not in ("", str(tmp_path))])
    monkeypatch.delitem(sys.modules, "cli_own_models", raising=False)
    assert main(["plan", "--model", "cli_own_models:build", "--group", "C8"]) == 0, capsys.readouterr().err
    assert "GMLinear C8" in capsys.readouterr().out
    sys.modules.pop("cli_own_models", None)


def test_the_compression_report_comes_before_fine_tuning(checkpoint, monkeypatch, capsys):
    printed_before = []
    real = gmcompress.training.finetune

    def spy(*args, **kwargs):
        printed_before.append(capsys.readouterr().out)
        return real(*args, **kwargs)

    monkeypatch.setattr(gmcompress.training, "finetune", spy)
    assert main(["finetune", *MLP, "--group", "C8", "--epochs", "1", "--quiet"]) == 0
    assert "params before" in printed_before[0] and "parameters" in printed_before[0]  # layer rows and totals
    after = capsys.readouterr().out
    assert "fine-tuned" in after and "params before" not in after
    assert main(["finetune", *MLP, "--checkpoint", str(checkpoint), "--epochs", "1", "--quiet"]) == 0
    import cli_models

    dense = sum(p.numel() for p in cli_models.build_mlp().parameters())
    assert re.search(rf"^parameters +{dense:,} ", printed_before[1], re.MULTILINE)  # the checkpoint's totals


def test_the_report_explains_a_weight_error_above_one(capsys):
    """An activation-aware fit minimises the output error: on inputs that excite few directions its weight error
    exceeds 1 while its output error stays below, and the legend says why."""
    import cli_models

    argv = ["compress", *MLP, "--group", "C8", "--rank", "1", "--calibration", "cli_models:narrow_inputs", "--quiet"]
    assert main(argv) == 0
    out = capsys.readouterr().out
    cells = next(re.split(r" {2,}", line) for line in out.splitlines() if line.startswith("2 "))
    fit_err, out_err = float(cells[7]), float(cells[8])
    assert fit_err > 1 > out_err
    assert "so fit err can exceed 1 (weights moved along input directions the data barely excite)" in out
    assert "about 1e-7 for exact GMs (modulate: false), about 1 or more for relaxed ones" in out
    # the column is the relative weight error, computed here from the fitted layer's dense weight
    small = gm.compress(
        cli_models.build_mlp(), group="C8", rank=1, calibration=cli_models.narrow_inputs(), progress=False
    )
    w, w_gm = (
        cli_models.build_mlp()[2].weight.detach().double(),
        getattr(small, "2").to_dense().weight.detach().double(),
    )
    assert float((w - w_gm).norm() / w.norm()) == pytest.approx(fit_err, abs=5e-4)
