"""Fine-tuning and save/load under interruptions, full disks and bad arguments; BatchNorm and feature-tap losses."""

import copy
import errno
import os
import re
import tempfile

import pytest
import torch
from test_finetune import tiny  # the same tiny student/teacher pair
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import gmcompress as gm
from gmcompress.training import finetune


def architecture():
    return nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Dropout(0.2), nn.Linear(32, 8))


def run(student, teacher, data, **kw):
    args = dict(steps=14, batch_size=16, lr=5e-3, loss="mix", device="cpu", progress=False, checkpoint_every=4)
    args.update(kw)
    return finetune(student, teacher, data, **args)


def same_weights(a, b):
    return all(torch.equal(v, b.state_dict()[k]) for k, v in a.state_dict().items())


# --- Ctrl-C after an epoch's last step ------------------------------------------------------------------------------


@pytest.mark.parametrize("form", ["dataset", "loader with a generator"])
def test_ctrl_c_after_an_epochs_last_step_resumes_with_that_epochs_end(tmp_path, form):
    """The interrupt lands after step 6 (the last of epoch 1) but before the epoch's end: the resumed run records
    that epoch (its mean loss, eval_fn, best.pt) and has the uninterrupted run's history, best.pt and weights."""
    probe = torch.randn(32, 16)

    def evaluate(model):
        with torch.no_grad():
            return {"out": float(model(probe).square().mean())}  # any function of the weights

    def data(x, y):
        if form == "dataset":
            return (x, y), {"batch_size": 16}
        loader = DataLoader(
            TensorDataset(x, y), batch_size=16, shuffle=True, generator=torch.Generator().manual_seed(3)
        )
        return loader, {"batch_size": None}

    def attempt(directory, **kw):
        student, teacher, (x, y) = tiny()
        batches, args = data(x, y)
        return student, run(student, teacher, batches, eval_fn=evaluate, checkpoint_dir=directory, **args, **kw)

    whole, expected = attempt(tmp_path / "whole")

    def interrupt(step):
        if step == 6:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        attempt(tmp_path / "cut", on_step=interrupt)
    resumed, result = attempt(tmp_path / "cut")
    assert result.resumed_from_step == 6
    assert result.history == expected.history and len(result.history) == 3  # epoch means and eval values, bit for bit
    assert result.best_metric == expected.best_metric
    assert same_weights(resumed, whole)
    best_whole, best_cut = (gm.load(tmp_path / d / "best.pt", architecture()) for d in ("whole", "cut"))
    assert same_weights(best_cut, best_whole)


# --- a full disk ----------------------------------------------------------------------------------------------------

needs_dev_full = pytest.mark.skipif(not os.path.exists("/dev/full"), reason="needs /dev/full (Linux)")


@pytest.fixture
def full_disk(monkeypatch):
    """Calling it makes every temp file that atomic_torch_save writes a link to /dev/full: each write fails as on a
    full disk (ENOSPC, from the kernel)."""
    real = tempfile.mkstemp

    def on_full_disk(*args, **kwargs):
        fd, path = real(*args, **kwargs)
        os.remove(path)
        os.symlink("/dev/full", path)
        return fd, path

    return lambda: monkeypatch.setattr(tempfile, "mkstemp", on_full_disk)


@needs_dev_full
def test_save_on_a_full_disk_names_the_file_and_keeps_the_old_one(tmp_path, full_disk):
    student, _, _ = tiny()
    path = tmp_path / "model.pt"
    gm.save(student, path)
    before = path.read_bytes()
    full_disk()
    with pytest.raises(OSError, match=re.escape(f"could not write {path}: the disk is full")) as err:
        gm.save(student, path)  # was RuntimeError: [enforce fail at inline_container.cc:672] . unexpected pos ...
    assert err.value.errno == errno.ENOSPC and err.value.filename == str(path)
    assert path.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["model.pt"]  # the temp file is gone


@needs_dev_full
def test_checkpoint_on_a_full_disk_leaves_the_last_one_whole(tmp_path, full_disk, monkeypatch):
    def fill_the_disk(step):
        if step == 7:  # the epoch end at step 6 wrote a checkpoint; the one at step 8 meets a full disk
            full_disk()

    with pytest.raises(OSError, match="the disk is full") as err:
        run(*tiny(), checkpoint_dir=tmp_path, on_step=fill_the_disk)
    assert err.value.errno == errno.ENOSPC and "last.pt" in err.value.filename
    assert f"The checkpoint of step 8 was not written to {tmp_path}; the one of step 6 is kept" in str(err.value)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["last.pt", "trainer.pt"]  # no .next, no temp file
    assert torch.load(tmp_path / "trainer.pt", weights_only=True)["step"] == 6
    monkeypatch.undo()  # space again
    assert run(*tiny(), checkpoint_dir=tmp_path).resumed_from_step == 6


# --- finetune's arguments, checked before any work ------------------------------------------------------------------


class ArgmaxFirst(nn.Module):
    def __init__(self, net):
        super().__init__()
        self.net = net

    def forward(self, x):
        logits = self.net(x)
        return logits.argmax(-1), logits


def frozen(model):
    for p in model.parameters():
        p.requires_grad_(False)
    return model


def labels_out_of_range(data):
    x, y = data
    y = y.clone()
    y[5] = 9
    return x, y


def report_best(model):
    return {"neg_mse": 0.0}


@pytest.mark.parametrize(
    "change, error, match",
    [
        (
            lambda a: a.update(student=ArgmaxFirst(a["student"]), teacher=ArgmaxFirst(a["teacher"])),
            ValueError,
            r"the student's first output tensor is torch\.int64 \(16,\), not floating point.*\(logits, argmax\)",
        ),
        (
            lambda a: a.update(eval_fn=report_best, best_metric="accuracy"),
            ValueError,
            r"best_metric='accuracy' is not among the metrics eval_fn returns \('neg_mse'\)",
        ),
        (
            lambda a: a.update(eval_fn=lambda m: 0.5),
            ValueError,
            r"eval_fn <lambda> must return a non-empty dict of metric names to numbers.*returned 0\.5",
        ),
        (lambda a: a.update(eval_fn=lambda m: {"acc": "high"}), ValueError, "not numbers: {'acc': 'high'}"),
        (lambda a: a.update(best_metric="acc"), ValueError, "best_metric='acc' names a metric of eval_fn, but no"),
        (
            lambda a: a.update(seed=2**70),
            ValueError,
            re.escape(f"seed must lie in 0..2**63 - 1 (torch seeds are 64-bit), got {2**70}"),
        ),
        (lambda a: a.update(seed=-1), ValueError, "seed must lie in 0..2"),
        (lambda a: a.update(device=5), ValueError, r"device=5: this machine has (no CUDA device|\d CUDA device)"),
        (lambda a: a.update(device="tpu"), ValueError, r"device='tpu' is not a device name: Expected one of cpu"),
        (lambda a: a.update(device=1.5), TypeError, r"device must be None, a string .* got 1\.5 \(float\)"),
        (lambda a: a.update(student=frozen(a["student"])), ValueError, "has no trainable parameter"),
        (
            lambda a: a.update(data=labels_out_of_range(a["data"]), loss="task"),
            ValueError,
            r"loss='task': the data's class labels must lie in 0\.\.7 .* range from 0 to 9",
        ),
        (
            lambda a: a.update(data=labels_out_of_range(a["data"]), loss="mix"),
            ValueError,
            r"loss='mix': the data's class labels must lie in 0\.\.7",
        ),
        (lambda a: a.update(checkpoint_dir=""), ValueError, r"checkpoint_dir is '' \(it would mean the current dir"),
        (lambda a: a.update(student={"0.weight": 1}), TypeError, "finetune: student must be a torch.nn.Module"),
        (lambda a: a.update(teacher="resnet18"), TypeError, "finetune: teacher must be a torch.nn.Module"),
        (lambda a: a.update(batchnorm="train"), ValueError, "batchnorm must be one of frozen, adapt, got 'train'"),
        (lambda a: a.update(trainable="gm"), ValueError, "trainable must be one of all, compressed, got 'gm'"),
        (
            lambda a: a.update(student=copy.deepcopy(a["teacher"]), trainable="compressed"),
            ValueError,
            r"trainable='compressed' trains the GM layers' parameters, but the student \(Sequential\) has none",
        ),
    ],
)  # fmt: skip
def test_bad_arguments_fail_before_any_work(tmp_path, change, error, match):
    student, teacher, data = tiny()
    args = dict(student=student, teacher=teacher, data=data, steps=3, batch_size=16, checkpoint_dir=tmp_path / "ck")
    change(args)
    state = copy.deepcopy(student.state_dict())
    with pytest.raises(error, match=match):
        finetune(progress=False, **args)
    assert not (tmp_path / "ck").exists()
    assert all(torch.equal(v, state[k]) for k, v in student.state_dict().items())


def test_a_checkpoint_dir_that_is_a_file_is_refused(tmp_path):
    (tmp_path / "ck").write_text("notes")
    for directory, where in (
        (tmp_path / "ck", "is a file"),
        (tmp_path / "ck" / "run1", f"is inside {tmp_path / 'ck'}"),
    ):
        with pytest.raises(ValueError, match=re.escape(f"checkpoint_dir {directory} {where}")):
            run(*tiny(), checkpoint_dir=directory)  # was FileExistsError / NotADirectoryError from mkdir


def test_labels_out_of_range_in_a_later_batch_stop_before_the_loss():
    student, teacher, (x, y) = tiny()
    batches = [(x[:16], y[:16]), (x[16:32], torch.full((16,), 8))]
    with pytest.raises(ValueError, match=r"loss='task': the data's class labels must lie in 0\.\.7 .* from 8 to 8"):
        finetune(student, teacher, batches, steps=2, loss="task", progress=False)  # was IndexError (CUDA: an assert)
    ignored = [(x[:16], torch.where(torch.arange(16) < 4, -100, y[:16]))]  # cross_entropy's ignore_index
    assert finetune(student, teacher, ignored, steps=1, loss="task", progress=False).steps == 1
    segmenter = nn.Conv2d(3, 5, 1)  # (B, C, H, W) scores: the classes are dimension 1, as cross_entropy reads them
    pixels = [(torch.randn(2, 3, 4, 6), torch.randint(0, 5, (2, 4, 6)))]
    assert finetune(segmenter, None, pixels, steps=1, loss="task", progress=False).steps == 1
    with pytest.raises(ValueError, match=r"must lie in 0\.\.4 .* from 5 to 5"):
        finetune(segmenter, None, [(pixels[0][0], torch.full((2, 4, 6), 5))], steps=1, loss="task", progress=False)


# --- save / load ----------------------------------------------------------------------------------------------------


def saved(tmp_path, edit=None):
    student, _, _ = tiny()
    path = tmp_path / "model.pt"
    gm.save(student, path)
    if edit is not None:
        data = torch.load(path, weights_only=True)
        edit(data)
        torch.save(data, path)
    return path


def test_a_newer_format_says_to_upgrade(tmp_path):
    path = saved(tmp_path, lambda d: d["manifest"].update(format="gmcompress/4", gmcompress_version="9.0"))
    with pytest.raises(ValueError, match=re.escape(f"{path}: a newer gmcompress format, 'gmcompress/4' (written by "
                                                   "gmcompress 9.0); this gmcompress reads 'gmcompress/3' and older. "
                                                   "Upgrade gmcompress")):  # fmt: skip
        gm.load(path, architecture())


def test_an_unknown_config_key_names_the_file_and_the_layer(tmp_path):
    path = saved(tmp_path, lambda d: d["manifest"]["layers"]["0"]["config"].update(dither=True))
    model = architecture()
    with pytest.raises(
        ValueError, match=re.escape(f"{path}: layer '0' (GMLinear) has a config this gmcompress cannot")
    ):
        gm.load(path, model)  # was TypeError: __init__() got an unexpected keyword argument 'dither'
    assert type(model[0]) is nn.Linear  # left as it was


def test_a_bad_map_location_is_not_called_a_corrupt_file(tmp_path):
    path = saved(tmp_path)
    with pytest.raises(ValueError, match=re.escape(f"map_location='tpu' cannot place the weights of {path}: ")):
        gm.load(path, architecture(), map_location="tpu")
    (tmp_path / "bad.pt").write_bytes(b"not a file")
    with pytest.raises(ValueError, match="not a readable gmcompress/torch file"):
        gm.load(tmp_path / "bad.pt", architecture(), map_location="tpu")  # a corrupt file is still reported as one


def test_save_to_a_directory_and_non_modules_are_clear_errors(tmp_path):
    student, _, _ = tiny()
    with pytest.raises(ValueError, match=re.escape(f"cannot save to {tmp_path}: it is a directory; give a file name")):
        gm.save(student, tmp_path)  # was IsADirectoryError from the rename
    path = tmp_path / "model.pt"
    with pytest.raises(TypeError, match=r"model must be a torch.nn.Module, got OrderedDict \(a state_dict\? pass the"):
        gm.save(student.state_dict(), path)
    with pytest.raises(TypeError, match=r"got PosixPath \(the arguments are model, path: the other way round\?\)"):
        gm.save(path, student)
    gm.save(student, path)
    with pytest.raises(TypeError, match="load: model must be a torch.nn.Module, got OrderedDict"):
        gm.load(path, architecture().state_dict())


def test_non_finite_weights_are_refused_on_load(tmp_path):
    student, _, _ = tiny()
    with torch.no_grad():
        student.get_submodule("3").bias[2] = float("nan")
        student.get_submodule("0").bias[0] = float("inf")
    path = tmp_path / "model.pt"
    gm.save(student, path)
    model = architecture()
    with pytest.raises(ValueError, match=re.escape(f"{path}: 2 weight tensor(s) hold NaN or inf (0.bias, 3.bias)")):
        gm.load(path, model)
    assert type(model[0]) is nn.Linear


# --- BatchNorm during distillation ----------------------------------------------------------------------------------


def conv_bn_net():
    torch.manual_seed(0)
    net = nn.Sequential(
        nn.Conv2d(8, 16, 3, padding=1), nn.BatchNorm2d(16), nn.ReLU(), nn.Flatten(), nn.Linear(16 * 16, 8)
    )
    with torch.no_grad():  # "pretrained" statistics, unlike those of the fine-tuning batches
        net[1].running_mean.uniform_(-1, 1)
        net[1].running_var.uniform_(0.5, 2)
        net[1].num_batches_tracked.fill_(1000)
    return net.eval()


@pytest.mark.parametrize("batchnorm", [None, "adapt"])
def test_batchnorm_statistics_are_kept_unless_adapt_is_asked(batchnorm):
    teacher = conv_bn_net()
    student = gm.compress(teacher, group="C8", rank=1, progress=False)
    bn = next(m for m in student.modules() if isinstance(m, nn.BatchNorm2d))
    stats = {k: v.clone() for k, v in bn.state_dict().items()}
    student.train()
    student.get_submodule("4").eval()  # a mode of the caller's own, kept
    modes = [m.training for m in student.modules()]
    data = TensorDataset(torch.randn(64, 8, 4, 4) * 3 + 1)
    chosen = {} if batchnorm is None else {"batchnorm": batchnorm}
    finetune(student, teacher, data, steps=4, batch_size=16, lr=1e-2, loss="kd", progress=False, **chosen)
    buffers = ("running_mean", "running_var", "num_batches_tracked")
    if batchnorm is None:  # the default: frozen
        assert all(torch.equal(bn.state_dict()[k], stats[k]) for k in buffers)
    else:
        assert not any(torch.equal(bn.state_dict()[k], stats[k]) for k in buffers)
    assert not torch.equal(bn.weight, stats["weight"]) and not torch.equal(bn.bias, stats["bias"])  # affine trains
    assert [m.training for m in student.modules()] == modes


@pytest.mark.parametrize("trainable", ["all", "compressed"])
def test_trainable_compressed_steps_only_the_gm_layers(trainable):
    """``trainable="compressed"``: the layers left dense (the first Linear, excluded) keep their weights bit for bit,
    the GM layer trains, and every requires_grad flag is as before; ``"all"`` trains the dense layer too."""
    teacher = architecture()
    student = gm.compress(teacher, group="C8", rank=2, exclude="0", progress=False)
    assert isinstance(student.get_submodule("3"), gm.nn.GMLinear) and isinstance(student.get_submodule("0"), nn.Linear)
    student.get_submodule("0").bias.requires_grad_(False)  # a flag of the caller's own, kept
    flags = {n: p.requires_grad for n, p in student.named_parameters()}
    before = copy.deepcopy(student.state_dict())
    finetune(student, teacher, torch.randn(64, 16), steps=4, batch_size=16, lr=1e-2, loss="kd", progress=False,
             trainable=trainable)  # fmt: skip
    after = student.state_dict()
    assert torch.equal(after["0.weight"], before["0.weight"]) == (trainable == "compressed")
    assert torch.equal(after["0.bias"], before["0.bias"])  # requires_grad False: never stepped
    assert any(not torch.equal(after[k], before[k]) for k in after if k.startswith("3."))
    assert {n: p.requires_grad for n, p in student.named_parameters()} == flags


def test_recipes_take_the_batchnorm_and_trainable_settings():
    from gmcompress.recipe import RecipeError, parse_recipe

    assert parse_recipe({"version": 1, "finetune": {"batchnorm": "adapt"}}).finetune == {"batchnorm": "adapt"}
    with pytest.raises(RecipeError, match=r"finetune.batchnorm: expected one of frozen, adapt, got 'train'"):
        parse_recipe({"version": 1, "finetune": {"batchnorm": "train"}})
    assert parse_recipe({"version": 1, "finetune": {"trainable": "compressed"}}).finetune == {"trainable": "compressed"}
    with pytest.raises(RecipeError, match=r"finetune.trainable: expected one of all, compressed, got 'gm'"):
        parse_recipe({"version": 1, "finetune": {"trainable": "gm"}})


# --- feature taps: each part's loss on its own scale ----------------------------------------------------------------


def scaled_pair(c):
    """Teacher and student whose tap "0" outputs are c times those at c = 1, with the same logits."""
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Linear(6, 40), nn.Linear(40, 3))
    student = copy.deepcopy(teacher)
    with torch.no_grad():
        for p in student.parameters():
            p.add_(0.1 * torch.randn_like(p))
        for net in (teacher, student):
            net[0].weight.mul_(c)
            net[0].bias.mul_(c)
            net[1].weight.div_(c)
    return student, teacher


@pytest.mark.parametrize("loss", ["mse", "cosine"])
def test_each_taps_loss_is_its_relative_error_whatever_its_scale(loss):
    x = torch.randn(16, 6)
    losses = []
    for c in (1.0, 2.0**10):  # a power of two: the scaled values are exact
        student, teacher = scaled_pair(c)
        with torch.no_grad():
            parts = [(student[0](x), teacher[0](x)), (student(x), teacher(x))]
        if loss == "mse":
            expected = sum(float((s - t).square().sum() / t.square().sum()) for s, t in parts) / 2
        else:
            expected = sum(float((1 - nn.functional.cosine_similarity(s, t)).mean()) for s, t in parts) / 2
        result = finetune(student, teacher, [(x,)], steps=1, loss=loss, features=["0"], progress=False)
        losses.append(result.history[0]["loss"])  # the first step's loss, before the update
        assert losses[-1] == pytest.approx(expected, rel=1e-5)
    assert losses[0] == pytest.approx(losses[1], rel=1e-6)  # the 40 tapped values do not drown the 3 logits
