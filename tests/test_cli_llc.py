"""``slt llc``: a user's model and data from "module:attr" specs, a checkpoint, a saved file."""

import inspect
import sys
import uuid

import pytest
import torch

import slt

pytest.importorskip("typer")
xr = pytest.importorskip("xarray")
pytest.importorskip("h5netcdf")
from typer.testing import CliRunner  # noqa: E402

from slt.cli import app  # noqa: E402

USER_MODULE = """
import torch

def make_model():
    model = torch.nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(1.0)
    return model

net = make_model()

def make_data():
    x = torch.randn(96, 2, generator=torch.Generator().manual_seed(0))
    return torch.utils.data.TensorDataset(x, x.sum(1, keepdim=True))

dataset = make_data()

def half_squared_error(model, batch):
    x, y = batch
    return 0.5 * ((model(x) - y) ** 2).sum(1).mean()

def needs_args(width):
    return torch.nn.Linear(width, 1)

not_a_model = 3

def raises():
    raise RuntimeError("boom in the factory")

def wider_data():
    x = torch.randn(32, 3)
    return torch.utils.data.TensorDataset(x, x[:, :1])

def empty_data():
    return torch.utils.data.TensorDataset(torch.empty(0, 2), torch.empty(0, 1))
"""
TINY = ["--num-chains", "2", "--num-draws", "20", "--num-burnin", "5", "--no-progress"]


@pytest.fixture
def user(tmp_path, monkeypatch):
    """A user's module file; its name on sys.path; sys.path and sys.modules restored after."""
    name = f"usermod_{uuid.uuid4().hex[:8]}"
    (tmp_path / f"{name}.py").write_text(USER_MODULE)
    monkeypatch.setattr(sys, "path", list(sys.path))
    monkeypatch.chdir(tmp_path)
    yield name, tmp_path / f"{name}.py"
    for module in [m for m in sys.modules if m.startswith(("_slt_cli_", "usermod_"))]:
        del sys.modules[module]


def invoke(*args):
    return CliRunner().invoke(app, ["llc", *map(str, args)])


def _direct(weight=1.0, batch_size=128, loss_fn=None, **kwargs):
    model = torch.nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(weight)
    x = torch.randn(96, 2, generator=torch.Generator().manual_seed(0))
    data = torch.utils.data.TensorDataset(x, x.sum(1, keepdim=True))
    loader = torch.utils.data.DataLoader(data, batch_size=batch_size, shuffle=True)
    settings = {"num_chains": 2, "num_draws": 20, "num_burnin": 5, "progress": False} | kwargs
    return slt.estimate_llc(model, loader, loss_fn or slt.gaussian_nll(1.0), **settings)


def test_file_specs_print_and_save(user, tmp_path):
    _, file = user
    out = tmp_path / "res" / "llc.nc"
    ran = invoke("--model", f"{file}:make_model", "--data", f"{file}:dataset", "--out", out, *TINY)
    assert ran.exit_code == 0, ran.output
    assert "LLC estimate" in ran.output and f"saved to {out}" in ran.output
    back = slt.load(out)
    want = _direct()
    assert back.llc == want.llc and (back.trace == want.trace).all()
    assert back.num_chains == 2 and back.sampler == "sgld" and back.nbeta_default
    with xr.open_dataset(out, group="posterior") as post:
        assert post["llc"].shape == (2, 20)


def test_module_specs_checkpoint_and_settings(user, tmp_path):
    name, _ = user
    torch.save({"state_dict": {"weight": torch.full((1, 2), 0.5)}}, tmp_path / "ckpt.pt")
    settings = {
        "--step-size": "2e-4",
        "--nbeta": "40",
        "--localization": "5",
        "--sampler": "rmsprop_sgld",
        "--control-variate": "loss",
        "--seed": "3",
        "--batch-size": "32",
    }
    ran = invoke(
        "--model", f"{name}:net", "--data", f"{name}:make_data",
        "--loss", f"{name}:half_squared_error", "--checkpoint", tmp_path / "ckpt.pt",
        *[x for kv in settings.items() for x in kv], *TINY,
    )  # fmt: skip
    assert ran.exit_code == 0, ran.output
    back = slt.load("llc.nc")  # the default --out, in the current folder
    want = _direct(
        weight=0.5,
        batch_size=32,
        loss_fn=slt.supervised(lambda out, y: 0.5 * ((out - y) ** 2).sum(1).mean()),
        step_size=2e-4,
        nbeta=40.0,
        localization=5.0,
        sampler="rmsprop_sgld",
        control_variate="loss",
        seed=3,
    )
    assert back.init_loss == want.init_loss  # the checkpoint's weights, not the model's
    assert back.llc == want.llc
    assert (back.step_size, back.nbeta, back.sampler, back.seed) == (2e-4, 40.0, "rmsprop_sgld", 3)


@pytest.mark.parametrize(
    ("option", "value", "message"),
    [
        ("--model", "nocolon", 'expected "pkg.module:attr"'),
        ("--model", "no_such_module_zz:f", "no module named 'no_such_module_zz'"),
        ("--model", "missing/file.py:f", "file missing/file.py does not exist"),
        ("--model", "{file}:nope", "has no attribute 'nope'"),
        ("--model", "{file}:not_a_model", "is of type int, not a torch.nn.Module"),
        ("--model", "{file}:needs_args", "must be callable with no arguments"),
        ("--model", "{file}:make_data", "returned an object of type TensorDataset, not a"),
        ("--data", "{file}:not_a_model", "not a map-style torch Dataset"),
        ("--loss", "hinge", 'expected "gaussian", "cross_entropy"'),
        ("--step-size", "fast", 'expected a number or "auto"'),
        ("--step-size", "-1", "--step-size must be a finite number > 0"),  # was step_size
        ("--microbatch", "big", 'expected an integer >= 1, "auto" or "none", got \'big\''),
        ("--microbatch", "0", 'expected an integer >= 1, "auto" or "none", got \'0\''),
        ("--sampler", "hmc", "--sampler must be one of"),
        ("--checkpoint", "nowhere.pt", "does not exist"),
    ],
)
def test_bad_arguments_exit_2_with_a_message(user, option, value, message):
    _, file = user
    args = {"--model": f"{file}:make_model", "--data": f"{file}:dataset"}
    args[option] = value.format(file=file)
    ran = invoke(*[x for kv in args.items() for x in kv], *TINY)
    assert ran.exit_code == 2, ran.output
    assert message in " ".join(ran.output.replace("│", " ").split()), ran.output


def test_checkpoint_errors(user, tmp_path):
    _, file = user
    spec = ["--model", f"{file}:make_model", "--data", f"{file}:dataset", *TINY]
    torch.save({"w": torch.zeros(1, 2), "b": torch.zeros(1)}, tmp_path / "wrong.pt")
    ran = invoke(*spec, "--checkpoint", tmp_path / "wrong.pt")
    text = " ".join(ran.output.replace("│", " ").split())
    assert ran.exit_code == 2 and "missing keys weight" in text and "unexpected keys w, b" in text
    torch.save({"weight": torch.zeros(3, 2)}, tmp_path / "shape.pt")
    ran = invoke(*spec, "--checkpoint", tmp_path / "shape.pt")
    assert ran.exit_code == 2 and "size mismatch" in ran.output
    marker = tmp_path / "pwned"
    torch.save({"weight": torch.zeros(1, 2), "x": _Payload(marker)}, tmp_path / "evil.pt")
    ran = invoke(*spec, "--checkpoint", tmp_path / "evil.pt")
    assert ran.exit_code == 2 and "refusing" in ran.output and not marker.exists()


def test_a_checkpoint_under_a_wrappers_prefix_loads_as_the_bare_model(user, tmp_path):
    # a LightningModule's checkpoint: {"state_dict": {"model.weight": ...}, "epoch": ...}
    _, file = user
    lightning = {"state_dict": {"model.weight": torch.full((1, 2), 0.5)}, "epoch": 3}
    ckpt, out = tmp_path / "epoch=3-step=90.ckpt", tmp_path / "llc.nc"
    torch.save(lightning, ckpt)
    ran = invoke("--model", f"{file}:make_model", "--data", f"{file}:dataset",
                 "--checkpoint", ckpt, "--out", out, *TINY)  # fmt: skip
    assert ran.exit_code == 0, ran.output
    back, want = slt.load(out), _direct(weight=0.5)
    assert back.init_loss == want.init_loss and back.llc == want.llc


class _Payload:
    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _passed_through(monkeypatch) -> dict:
    """Replace estimate_llc by a stand-in that records its keyword arguments (returned)."""
    seen = {}
    real = _direct()

    def fake(model, loader, loss_fn, **kwargs):
        seen.update(kwargs)
        return real

    monkeypatch.setattr(slt, "estimate_llc", fake)
    return seen


def test_step_size_auto_is_passed_through(user, monkeypatch):
    _, file = user
    seen = _passed_through(monkeypatch)
    spec = ["--model", f"{file}:make_model", "--data", f"{file}:dataset", "--step-size", "auto"]
    ran = invoke(*spec, *TINY)
    assert ran.exit_code == 0, ran.output
    assert seen["step_size"] == "auto"


@pytest.mark.parametrize(
    ("flags", "expected"),
    [([], ("auto", False)), (["--compile"], ("vmap", True)),
     (["--chain-method", "loop"], ("loop", False))],
)  # fmt: skip
def test_chain_method_and_compile_are_passed_through(user, monkeypatch, flags, expected):
    _, file = user
    seen = _passed_through(monkeypatch)
    ran = invoke("--model", f"{file}:make_model", "--data", f"{file}:dataset", *flags, *TINY)
    assert ran.exit_code == 0, ran.output
    assert (seen["chain_method"], seen["compile"]) == expected


def test_compile_with_the_loop_is_refused_by_name(user):
    _, file = user
    spec = ["--model", f"{file}:make_model", "--data", f"{file}:dataset"]
    ran = invoke(*spec, "--chain-method", "loop", "--compile", *TINY)
    assert ran.exit_code == 2 and "--compile needs --chain-method" in ran.output  # the options'


def test_a_module_that_imports_a_missing_package_is_one_line(user, tmp_path):
    # a module spec whose module imports something missing: a ~50-line traceback, exit 1
    (tmp_path / "needs_more.py").write_text("import not_installed_xyz\nmake = None\n")
    ran = invoke("--model", "needs_more:make", "--data", f"{user[1]}:dataset", *TINY)
    assert ran.exit_code == 2 and "Traceback" not in ran.output
    assert "importing needs_more" in ran.output and "not_installed_xyz" in ran.output


def test_evidence_refuses_a_potential_it_would_ignore(user):
    _, file = user
    ran = CliRunner().invoke(app, ["evidence", "--model", f"{file}:make_model", "--data",
                                   f"{file}:dataset", "--potential", "5,5"])  # fmt: skip
    assert ran.exit_code == 2 and "--potential" in ran.output


def test_compile_with_a_sampler_it_cannot_run_names_the_options(user):
    _, file = user
    spec = ["--model", f"{file}:make_model", "--data", f"{file}:dataset"]
    ran = invoke(*spec, "--compile", "--sampler", "sgnht", *TINY)  # was "chain_method=..."
    assert ran.exit_code == 2
    assert "--compile runs the batched step, which supports --sampler sgld" in ran.output


def test_a_step_compile_cannot_compile_is_one_line_in_the_commands_words(user):
    # a model whose forward breaks the graph: torch.compile(fullgraph=True) refuses it. It
    # was a ~180-line traceback ending in "pass compile=False"
    _, file = user
    file.write_text(
        file.read_text()
        + """
class Breaks(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = torch.nn.Linear(2, 1, bias=False)

    def forward(self, x):
        torch._dynamo.graph_break()  # nothing in eager mode
        return self.lin(x)
"""
    )
    ran = invoke("--model", f"{file}:Breaks", "--data", f"{file}:dataset", "--compile", *TINY)
    assert ran.exit_code == 1, ran.output
    (line,) = [x for x in ran.output.splitlines() if x.startswith("Error:")]
    assert line.startswith("Error: --compile: torch.compile could not compile")
    assert line.endswith("drop --compile") and "Traceback" not in ran.output


def _accepts_auto() -> bool:
    doc = inspect.getdoc(slt.estimate_llc) or ""
    hint = str(inspect.signature(slt.estimate_llc).parameters["step_size"].annotation)
    return '"auto"' in doc or "auto" in hint


@pytest.mark.skipif(not _accepts_auto(), reason='estimate_llc does not accept step_size="auto" yet')
def test_step_size_auto_runs(user, tmp_path):
    _, file = user
    spec = ["--model", f"{file}:make_model", "--data", f"{file}:dataset", "--step-size", "auto"]
    ran = invoke(*spec, "--out", tmp_path / "auto.nc", *TINY)
    assert ran.exit_code == 0, ran.output
    assert slt.load(tmp_path / "auto.nc").step_size > 0


def test_microbatch_runs_and_is_recorded(user, tmp_path):
    _, file = user
    out = tmp_path / "mb.nc"
    spec = ["--model", f"{file}:make_model", "--data", f"{file}:dataset", "--batch-size", "32"]
    ran = invoke(*spec, "--microbatch", "8", "--out", str(out), *TINY)
    assert ran.exit_code == 0, ran.output
    assert "control variate gradient (micro-batches of 8)" in ran.output
    assert slt.load(out).microbatch == 8
    ran = invoke(*spec, "--microbatch", "5", *TINY)  # 96 samples, batches of 32
    assert ran.exit_code == 2
    assert (
        "--microbatch must divide the number of samples (96) and the batch size (32)" in ran.output
    )
    for word in ("none", "auto"):  # the small model has its per-sample table: no micro-batches
        ran = invoke(*spec, "--microbatch", word, "--out", str(out), *TINY)
        assert ran.exit_code == 0, ran.output
        assert slt.load(out).microbatch is None and "micro-batches" not in ran.output


@pytest.mark.parametrize(
    ("model", "data", "option", "message"),
    [
        ("raises", "dataset", "--model", "raises() raised RuntimeError: boom in the factory"),
        ("make_model", "wider_data", "--model, --data, --loss",
         "the loss on the first batch raised RuntimeError: mat1 and mat2 shapes"),
        ("make_model", "empty_data", "--data", "the dataset is empty"),
    ],
)  # fmt: skip
def test_what_the_users_code_raises_is_one_line_naming_the_option(user, tmp_path, model, data,
                                                                  option, message):  # fmt: skip
    _, file = user
    ran = invoke("--model", f"{file}:{model}", "--data", f"{file}:{data}",
                 "--out", tmp_path / "llc.nc", *TINY)  # fmt: skip
    assert ran.exit_code == 2 and "Traceback" not in ran.output
    text = " ".join(ran.output.replace("│", " ").split())
    assert f"Invalid value for {option}" in text and message in text
    assert not (tmp_path / "llc.nc").exists()


def test_a_model_file_that_fails_to_load_is_named(user, tmp_path):
    broken = tmp_path / "broken.py"
    broken.write_text("def make(:\n")
    ran = invoke("--model", f"{broken}:make", "--data", f"{user[1]}:dataset", *TINY)
    text = " ".join(ran.output.replace("│", " ").split())
    assert ran.exit_code == 2 and "raised SyntaxError" in text and "--model" in text


RAGGED = """
import torch

class Ragged(torch.utils.data.Dataset):  # the third sample is longer: the second batch fails
    def __len__(self):
        return 8

    def __getitem__(self, i):
        width = 3 if i == 6 else 2
        return torch.ones(width), torch.ones(1)

def make_model():
    return torch.nn.Linear(2, 1)
"""


def test_errors_a_new_user_met_are_one_line(user, tmp_path):
    # each was a meaningless error, a traceback, or an option named in Python's words
    name, file = user
    (tmp_path / "data.pt").write_bytes(b"")
    for spec in ("./data.pt:x", "data.pt:x"):  # the bare name was "no module named 'data'"
        ran = invoke("--model", f"{file}:make_model", "--data", spec, *TINY)
        assert ran.exit_code == 2
        assert "is not a Python file" in " ".join(ran.output.split())  # was 'NoneType' ...
    (tmp_path / "ragged.py").write_text(RAGGED)
    ran = invoke("--model", "ragged.py:make_model", "--data", "ragged.py:Ragged",
                 "--batch-size", "4", *TINY)  # fmt: skip
    assert ran.exit_code == 1 and "Traceback" not in ran.output
    assert "Error: RuntimeError: stack expects each tensor to be equal size" in ran.output
    ran = invoke("--model", f"{file}:make_model", "--data", f"{file}:dataset", "--nbeta", "-3",
                 *TINY)  # fmt: skip
    assert ran.exit_code == 2 and "--nbeta must be" in ran.output


def test_help_fits_eighty_columns():
    # rich's table cut option text at 80 columns (the width when piped): --control-varia…
    ran = CliRunner().invoke(app, ["llc", "--help"], env={"COLUMNS": "80"}, terminal_width=80)
    assert ran.exit_code == 0 and "…" not in ran.output
    assert '"pkg.module:factory" or' in ran.output and "--control-variate <str>" in ran.output


def test_an_option_that_would_be_ignored_is_refused(user):
    # --sigma with another loss (and trajectory's --max-workers without a pool) did nothing
    _, file = user
    ran = invoke("--model", f"{file}:make_model", "--data", f"{file}:dataset",
                 "--loss", "cross_entropy", "--sigma", "2", *TINY)  # fmt: skip
    assert ran.exit_code == 2 and "--sigma is σ of --loss gaussian" in ran.output
    args = ["trajectory", ".", "--model", f"{file}:make_model", "--data", f"{file}:dataset"]
    ran = CliRunner().invoke(app, [*args, "--max-workers", "2", *TINY])
    assert ran.exit_code == 2 and "--max-workers sizes --executor process's pool" in ran.output


def test_the_summarys_warnings_name_options(user):
    # its advice said num_burnin, num_draws, localization: the library's names
    _, file = user
    ran = invoke("--model", f"{file}:make_model", "--data", f"{file}:dataset", *TINY)
    assert ran.exit_code == 0, ran.output
    warned = [line for line in ran.output.splitlines() if "warning:" in line]
    assert warned and any("--num-draws" in line for line in warned)
    assert not any("num_draws" in line or "num_burnin" in line for line in warned)
    assert "step_size 0.0001" in ran.output  # the settings line keeps the result's own names
