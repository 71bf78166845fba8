"""Checkpoints as training frameworks write them: a Hugging Face Trainer's
``checkpoint-<step>/`` folders, and weights under a wrapper's prefix (Lightning's
``model.``, DDP's ``module.``, torch.compile's ``_orig_mod.``)."""

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from slt.trajectory import llc_trajectory, make_jobs

sys.path.insert(0, str(Path(__file__).parent))
import _trajectory_helpers as h  # noqa: E402

SETTINGS = dict(num_chains=2, num_draws=40, num_burnin=10, step_size=1e-3, seed=3,
                progress=False)  # fmt: skip


def trainer_output(folder, states, *, bin_at=()):
    """A Trainer's output_dir: checkpoint-<step>/ with model.safetensors (pytorch_model.bin
    at the steps in ``bin_at``) beside the optimizer state, and files that are not weights."""
    safetensors_torch = pytest.importorskip("safetensors.torch")
    (folder / "runs").mkdir(parents=True)
    (folder / "config.json").write_text("{}")
    for step, state in states.items():
        sub = folder / f"checkpoint-{step}"
        sub.mkdir()
        (sub / "trainer_state.json").write_text("{}")
        torch.save({"state": {}}, sub / "optimizer.pt")
        if step in bin_at:
            torch.save(state, sub / "pytorch_model.bin")
        else:
            safetensors_torch.save_file(state, str(sub / "model.safetensors"))


def states(folder, num):
    """``num`` state dicts along gradient descent (the helpers' checkpoints, saved in
    ``folder`` and read back)."""
    folder.mkdir()
    return [torch.load(p, weights_only=True) for p in h.checkpoints(folder, num=num)]


def test_a_trainer_output_dir_is_read_by_checkpoint_folder_in_step_order(tmp_path):
    path = states(tmp_path / "states", 3)
    out = tmp_path / "out"
    trainer_output(out, {1000: path[2], 50: path[0], 500: path[1]}, bin_at=(500,))
    jobs = make_jobs(out)
    assert [j.step for j in jobs] == [50, 500, 1000]  # by value: 1000 is not before 50
    assert [j.label for j in jobs] == [
        str(Path("checkpoint-50", "model.safetensors")),
        str(Path("checkpoint-500", "pytorch_model.bin")),
        str(Path("checkpoint-1000", "model.safetensors")),
    ]
    traj = llc_trajectory(out, h.linear, h.loader(), h.nll, **SETTINGS)
    same = llc_trajectory({50: path[0], 500: path[1], 1000: path[2]}, h.linear, h.loader(),
                          h.nll, **SETTINGS)  # fmt: skip
    np.testing.assert_array_equal(traj.steps, [50, 500, 1000])
    np.testing.assert_array_equal(traj.llc, same.llc)


def test_a_checkpoint_folder_without_one_weights_file_is_refused_by_name(tmp_path):
    out = tmp_path / "out"
    trainer_output(out, {10: states(tmp_path / "states", 1)[0]})
    sharded = out / "checkpoint-20"
    sharded.mkdir()
    (sharded / "model.safetensors.index.json").write_text("{}")
    with pytest.raises(ValueError, match=r"checkpoint-20 holds sharded weights"):
        make_jobs(out)
    (sharded / "model.safetensors.index.json").unlink()
    with pytest.raises(ValueError, match=r"checkpoint-20 holds no weights file"):
        make_jobs(out)


def test_an_empty_folder_names_both_layouts(tmp_path):
    with pytest.raises(ValueError, match=r"no checkpoint files .* and no checkpoint-<step>"):
        make_jobs(tmp_path)


@pytest.mark.parametrize("prefix", ["model.", "module.", "_orig_mod.", "module._orig_mod."])
def test_weights_under_a_wrappers_prefix_load_as_the_bare_models(tmp_path, prefix):
    path = states(tmp_path / "states", 2)
    ckpts = tmp_path / "ckpts"
    ckpts.mkdir()
    wrapped = {
        10 * i: {"state_dict": {prefix + k: v for k, v in sd.items()}, "epoch": i}
        for i, sd in enumerate(path)
    }
    for step, content in wrapped.items():
        torch.save(content, ckpts / f"epoch={step // 10}-step={step}.ckpt")
    traj = llc_trajectory(ckpts, h.linear, h.loader(), h.nll, **SETTINGS)
    bare = llc_trajectory({0: path[0], 10: path[1]}, h.linear, h.loader(), h.nll, **SETTINGS)
    np.testing.assert_array_equal(traj.steps, [0, 10])
    np.testing.assert_array_equal(traj.llc, bare.llc)


def test_a_prefix_that_does_not_make_the_models_keys_is_named_not_taken(tmp_path):
    sd = states(tmp_path / "states", 1)[0]
    ckpts = tmp_path / "ckpts"
    ckpts.mkdir()
    extra = {**{"model." + k: v for k, v in sd.items()}, "loss_fn.pos_weight": torch.ones(1)}
    torch.save({"state_dict": extra}, ckpts / "step=5.ckpt")
    with pytest.raises(ValueError, match=r"missing keys .*weight.*unexpected keys .*model\."):
        llc_trajectory(ckpts, h.linear, h.loader(), h.nll, **SETTINGS)


def test_the_final_save_beside_the_checkpoint_folders_is_left_out_and_said(tmp_path):
    # trainer.train(); trainer.save_model(): model.safetensors and training_args.bin land in
    # output_dir itself, beside the checkpoint folders (read as one step-0 point, or refused)
    safetensors_torch = pytest.importorskip("safetensors.torch")
    path = states(tmp_path / "states", 3)
    out = tmp_path / "out"
    trainer_output(out, {10: path[0], 20: path[1]})
    safetensors_torch.save_file(path[2], str(out / "model.safetensors"))
    torch.save({"lr": 0.1}, out / "training_args.bin")
    with pytest.warns(UserWarning, match=r"final save model\.safetensors beside them is left"):
        jobs = make_jobs(out)
    assert [j.step for j in jobs] == [10, 20]
    torch.save(path[2], out / "step_30.pt")  # a checkpoint file of another layout
    with pytest.raises(ValueError, match=r"checkpoint-<step> folders and other .*step_30\.pt"):
        make_jobs(out)


def test_trainer_labels_do_not_change_when_checkpoints_come_or_go(tmp_path):
    # a label that depended on the other checkpoints (bare "model.safetensors" while alone)
    # recomputed a checkpoint on the rerun, or refused it as changed
    path = states(tmp_path / "states", 2)
    out, results = tmp_path / "out", tmp_path / "r.jsonl"
    trainer_output(out, {10: path[0]})
    first = llc_trajectory(out, h.linear, h.loader(), h.nll, results=results, **SETTINGS)
    assert list(first.labels) == [str(Path("checkpoint-10", "model.safetensors"))]
    pytest.importorskip("safetensors.torch").save_file(path[1], str(_folder(out, 20)))
    again = llc_trajectory(out, h.linear, h.loader(), h.nll, results=results, **SETTINGS)
    assert (again.num_reused, again.num_computed) == (1, 1)
    assert again.llc[0] == first.llc[0]


def _folder(out, step):
    (out / f"checkpoint-{step}").mkdir()
    return out / f"checkpoint-{step}" / "model.safetensors"


def test_two_checkpoint_folders_of_one_step_are_named(tmp_path):
    out = tmp_path / "out"
    sd = states(tmp_path / "states", 1)[0]
    trainer_output(out, {500: sd})
    (out / "checkpoint-0500").mkdir()
    torch.save(sd, out / "checkpoint-0500" / "pytorch_model.bin")
    with pytest.raises(ValueError, match=r"same step: checkpoint-0500, checkpoint-500"):
        make_jobs(out)


class Tied(torch.nn.Module):
    """Two layers sharing one weight, as a language model's embedding and output head."""

    def __init__(self):
        super().__init__()
        self.enc = torch.nn.Linear(3, 3, bias=False)
        self.dec = torch.nn.Linear(3, 3, bias=False)
        self.dec.weight = self.enc.weight
        self.head = torch.nn.Linear(3, 1)

    def forward(self, x):
        return self.head(torch.tanh(self.dec(torch.tanh(self.enc(x)))))


def test_a_tied_weight_the_file_leaves_out_is_read_from_its_twin(tmp_path):
    # save_pretrained stores a tied weight once (GPT-2's lm_head.weight is left out)
    torch.manual_seed(0)
    full = Tied().state_dict()
    assert full["enc.weight"].data_ptr() == full["dec.weight"].data_ptr()
    saved = {k: v.clone() for k, v in full.items() if k != "dec.weight"}
    traj = llc_trajectory({5: saved}, Tied, h.loader(), h.nll, **SETTINGS)
    whole = llc_trajectory({5: {k: v.clone() for k, v in full.items()}}, Tied, h.loader(),
                           h.nll, **SETTINGS)  # fmt: skip
    np.testing.assert_array_equal(traj.llc, whole.llc)
    np.testing.assert_array_equal(traj.loss, whole.loss)
    untied = {k: v for k, v in saved.items() if k != "head.bias"}  # not tied: still missing
    with pytest.raises(ValueError, match=r"missing keys head\.bias;"):
        llc_trajectory({5: untied}, Tied, h.loader(), h.nll, **SETTINGS)


def test_a_wrappers_prefix_and_a_left_out_tied_weight_together(tmp_path):
    # a Lightning checkpoint of a model with tied weights, saved without the twin
    torch.manual_seed(0)
    full = Tied().state_dict()
    saved = {"model." + k: v.clone() for k, v in full.items() if k != "dec.weight"}
    traj = llc_trajectory({5: saved}, Tied, h.loader(), h.nll, **SETTINGS)
    whole = llc_trajectory({5: {k: v.clone() for k, v in full.items()}}, Tied, h.loader(),
                           h.nll, **SETTINGS)  # fmt: skip
    np.testing.assert_array_equal(traj.llc, whole.llc)
    with pytest.raises(ValueError, match=r"missing keys .*; unexpected keys \(none\)"):
        llc_trajectory({5: {}}, Tied, h.loader(), h.nll, **SETTINGS)  # an empty state dict


def test_a_prefix_slt_does_not_know_is_named_with_the_way_to_load_it(tmp_path):
    # lightning-hydra-template's LightningModule keeps its network as self.net
    sd = states(tmp_path / "states", 1)[0]
    ckpts = tmp_path / "ckpts"
    ckpts.mkdir()
    torch.save({"state_dict": {"net." + k: v for k, v in sd.items()}}, ckpts / "step=5.ckpt")
    hint = r"keys carry the prefix 'net\.': pass the state dict with it taken off, \{k\.remo"
    with pytest.raises(ValueError, match=hint):
        llc_trajectory(ckpts, h.linear, h.loader(), h.nll, **SETTINGS)
    mixed = {**{"net." + k: v for k, v in sd.items()}, "criterion.w": torch.ones(1)}
    torch.save({"state_dict": mixed}, ckpts / "step=5.ckpt")  # two prefixes: no guess
    with pytest.raises(ValueError, match=r"unexpected keys [^(]*$"):
        llc_trajectory(ckpts, h.linear, h.loader(), h.nll, **SETTINGS)
