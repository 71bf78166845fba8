"""``slt.io``: results saved to netCDF come back field by field identical."""

import dataclasses
import json
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

import slt
from slt import zoo

xr = pytest.importorskip("xarray")
pytest.importorskip("h5netcdf")
pytest.importorskip("h5py")
from slt import io  # noqa: E402


def _estimate(**kwargs):
    x = torch.randn(96, 2, generator=torch.Generator().manual_seed(0))
    data = torch.utils.data.TensorDataset(x, x.sum(1, keepdim=True))
    model = torch.nn.Linear(2, 1, bias=False)
    with torch.no_grad():
        model.weight.fill_(1.0)
    loader = torch.utils.data.DataLoader(data, batch_size=32, shuffle=True)
    settings = {"num_chains": 2, "num_draws": 15, "num_burnin": 3, "progress": False} | kwargs
    return slt.estimate_llc(model, loader, slt.gaussian_nll(1.0), **settings)


SETTINGS = {
    "sgld": {},
    "rmsprop_sgld-loss-nbeta": {
        "sampler": "rmsprop_sgld",
        "control_variate": "loss",
        "nbeta": 50.0,
        "localization": 10.0,
        "seed": 7,
    },
    "one-chain-none": {"control_variate": "none", "num_chains": 1, "step_size": 3e-4},
}


@pytest.fixture(scope="module")
def results():
    return {name: _estimate(**kwargs) for name, kwargs in SETTINGS.items()}


def _diverged(res):
    """A result with chain 0 diverged: NaNs in its trace and per-chain λ̂, unicode warnings."""
    trace = res.trace.copy()
    trace[0, 5:] = np.nan
    trace[0, 7] = np.inf
    per_chain = res.llc_per_chain.copy()
    per_chain[0] = np.nan
    return dataclasses.replace(
        res,
        trace=trace,
        llc_per_chain=per_chain,
        diverged=np.array([True, False]),
        llc_std=math.nan,
        warnings=res.warnings + ("chain 0 diverged: λ̂ ≠ ∞ — lower ε 🙂", 'quotes " and \\ too'),
    )


def assert_same(a, b, name=""):
    """Same type and value; arrays bit for bit (NaN payloads too), NaN equal to NaN."""
    assert type(a) is type(b), name
    if isinstance(b, np.ndarray):
        assert a.dtype == b.dtype and a.shape == b.shape, name
        assert a.tobytes() == b.tobytes(), name
    elif isinstance(b, dict):
        assert list(a) == list(b), name
        for key in b:
            assert_same(a[key], b[key], f"{name}[{key!r}]")
    elif isinstance(b, list | tuple):
        assert len(a) == len(b), name
        for i, (x, y) in enumerate(zip(a, b)):
            assert_same(x, y, f"{name}[{i}]")
    elif dataclasses.is_dataclass(b):
        for field in dataclasses.fields(b):
            assert_same(getattr(a, field.name), getattr(b, field.name), f"{name}.{field.name}")
    elif isinstance(b, float) and math.isnan(b):
        assert math.isnan(a), name
    else:
        assert a == b, name


def assert_identical(got, want):
    assert type(got) is type(want)
    for field in dataclasses.fields(want):
        assert_same(getattr(got, field.name), getattr(want, field.name), field.name)


@pytest.mark.parametrize("name", list(SETTINGS))
def test_round_trip_is_exact(results, tmp_path, name):
    res = results[name]
    res.save(tmp_path / "res.nc")
    assert_identical(slt.load(tmp_path / "res.nc"), res)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["res.nc"]  # no temp file left


def test_round_trip_with_a_diverged_chain(results, tmp_path):
    res = _diverged(results["sgld"])
    io.save(res, str(tmp_path / "div.nc"))
    back = io.load(str(tmp_path / "div.nc"))
    assert_identical(back, res)
    assert np.isnan(back.trace[0, 5]) and np.isposinf(back.trace[0, 7])
    assert back.warnings[-2].endswith("🙂")


def test_plain_xarray_reads_the_arviz_layout(results, tmp_path):
    res = _diverged(results["sgld"])
    res.save(tmp_path / "res.nc")
    tree = xr.open_datatree(tmp_path / "res.nc")
    assert {"posterior", "sample_stats"} <= set(tree.children)
    post = xr.open_dataset(tmp_path / "res.nc", group="posterior")
    assert post["llc"].dims == ("chain", "draw")
    np.testing.assert_array_equal(post["llc"].values, res.llc_trace)
    np.testing.assert_array_equal(post["loss"].values, res.trace)
    np.testing.assert_array_equal(post["loss_at_center"].values, res.trace_at_center)
    np.testing.assert_array_equal(post["chain"].values, [0, 1])
    stats = tree["sample_stats"]
    np.testing.assert_array_equal(stats["diverged"].values, [True, False])
    np.testing.assert_array_equal(stats["llc_per_chain"].values, res.llc_per_chain)
    for group in (tree, tree["posterior"], tree["sample_stats"]):
        assert group.attrs["inference_library"] == "slt"
        assert group.attrs["inference_library_version"] == slt.__version__
        assert "created_at" in group.attrs
    attrs = tree.attrs
    assert attrs["llc"] == res.llc and attrs["seed"] == res.seed
    assert attrs["sampler"] == "sgld" and attrs["nbeta_default"] == 1
    assert json.loads(attrs["warnings"]) == list(res.warnings)
    assert attrs["slt_schema"] == io.SCHEMA
    post.close()
    tree.close()


@dataclasses.dataclass(frozen=True)
class Extended(slt.LLCResult):
    """LLCResult plus fields of the kinds others are adding."""

    acceptance: np.ndarray = None  # (chain, draw) float32
    per_sample: np.ndarray = None  # (chain, draw, k)
    steps_run: np.ndarray = None  # (chain,) int64
    mala_acceptance: float = 0.0
    rhat: np.float64 = np.float64(1.0)
    ess_bulk: float = math.nan
    calibration: dict | None = None
    note: str | None = None
    fixed: bool = False
    big: int = 0
    ladder: tuple = ()
    scalar_array: np.ndarray = None  # ()
    settings: object = None  # a dataclass of slt
    candidates: tuple = ()  # of dataclasses
    extra_only_in_new_versions: int = 5


@pytest.fixture
def extended(results, monkeypatch):
    monkeypatch.setitem(io._RESULT_TYPES, "Extended", Extended)
    base = results["sgld"]
    shape = base.trace.shape
    return Extended(
        **{f.name: getattr(base, f.name) for f in dataclasses.fields(base)}
        | dict(
            acceptance=np.linspace(0, 1, math.prod(shape), dtype=np.float32).reshape(shape),
            per_sample=np.arange(math.prod(shape) * 3, dtype=np.int32).reshape(*shape, 3),
            steps_run=np.array([18, 9]),
            mala_acceptance=0.574,
            rhat=np.float64(1.013),
            calibration={
                "step_size": [1e-4, 3e-4],
                "chosen": 1e-4,
                "nan": math.nan,
                "ok": True,
                "grid": np.array([[1e-4, np.nan], [3e-4, 1e-3]], dtype=np.float32),
                "pair": (np.int16(3), "b", None),
            },
            note=None,
            fixed=True,
            big=2**70,
            ladder=(0.5, 1.0, 2.0),
            scalar_array=np.array(2.5, dtype=np.float16),
            settings=zoo.Settings(step_size=2e-5, num_chains=3),
            candidates=(zoo.Settings(), zoo.Settings(sampler="rmsprop_sgld")),
        )
    )


def test_new_fields_are_placed_by_their_value(extended, tmp_path):
    io.save(extended, tmp_path / "ext.nc")
    assert_identical(io.load(tmp_path / "ext.nc"), extended)
    tree = xr.open_datatree(tmp_path / "ext.nc")
    stats = tree["sample_stats"]
    assert stats["acceptance_rate"].dims == ("chain", "draw")  # ArviZ's name
    assert stats["acceptance_rate"].dtype == np.float32
    assert stats["per_sample"].dims == ("chain", "draw", "per_sample_dim_0")
    assert stats["steps_run"].dims == ("chain",)
    assert tree["scalar_array"].dims == ()
    assert tree.attrs["mala_acceptance"] == 0.574 and tree.attrs["fixed"] == 1
    assert json.loads(tree.attrs["calibration"])["chosen"] == 1e-4
    tree.close()


def test_unknown_content_does_not_break_load(extended, tmp_path, monkeypatch):
    """A file from a newer slt, or edited with xarray: extras are ignored."""
    io.save(extended, tmp_path / "new.nc")
    with xr.open_datatree(tmp_path / "new.nc") as tree:
        tree = tree.load()
    post = tree["posterior"].to_dataset()
    tree["posterior"] = post.assign(extra=post["loss"] * 2)
    stats = tree["sample_stats"].to_dataset()
    tree["sample_stats"] = stats.assign(lp=-stats["acceptance_rate"]).assign_attrs(note="hi")
    fields = json.loads(tree.attrs["slt_fields"])
    fields["from_the_future"] = {"kind": "array", "group": "sample_stats", "name": "lp"}
    tree.attrs |= {"slt_fields": json.dumps(fields), "slt_schema": io.SCHEMA + 1, "x": "y"}
    tree.to_netcdf(tmp_path / "edited.nc", engine="h5netcdf")
    # and an older slt whose result class lacks a field the file has
    older = dataclasses.make_dataclass(
        "Extended",
        [(f.name, f.type, f) for f in dataclasses.fields(Extended)][:-1],
        frozen=True,
    )
    for cls in (Extended, older):
        monkeypatch.setitem(io._RESULT_TYPES, "Extended", cls)
        with pytest.warns(UserWarning, match="newer than this slt"):
            back = io.load(tmp_path / "edited.nc")
        for field in dataclasses.fields(cls):
            assert_same(getattr(back, field.name), getattr(extended, field.name), field.name)


def test_missing_extra_says_which(results, tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "xarray", None)
    with pytest.raises(ImportError, match=r"pip install 'slt\[io\]'"):
        results["sgld"].save(tmp_path / "res.nc")
    with pytest.raises(ImportError, match=r"xarray is missing.*slt\[io\]"):
        slt.load(tmp_path / "res.nc")


def test_errors(results, tmp_path, monkeypatch):
    with pytest.raises(FileNotFoundError, match="nowhere.nc"):
        slt.load(tmp_path / "nowhere.nc")
    with pytest.raises(FileNotFoundError, match="does not exist"):
        results["sgld"].save(tmp_path / "no" / "such" / "folder.nc")
    with pytest.raises(TypeError, match="result dataclass"):
        io.save({"llc": 1.0}, tmp_path / "dict.nc")
    bad = Extended(**{**vars(results["sgld"]), "note": object()})
    monkeypatch.setitem(io._RESULT_TYPES, "Extended", Extended)
    with pytest.raises(TypeError, match="field 'note' of type object"):
        io.save(bad, tmp_path / "bad.nc")
    results["sgld"].save(tmp_path / "res.nc")
    newer = dataclasses.make_dataclass("LLCResult", [("llc", float), ("new_required", int)])
    monkeypatch.setitem(io._RESULT_TYPES, "LLCResult", newer)
    with pytest.raises(ValueError, match=r"res\.nc lacks field\(s\) new_required of LLCResult"):
        slt.load(tmp_path / "res.nc")
    xr.Dataset({"a": ("x", [1.0])}).to_netcdf(tmp_path / "other.nc", engine="h5netcdf")
    with pytest.raises(ValueError, match="not a result saved by slt"):
        slt.load(tmp_path / "other.nc")


def test_bad_paths_are_named_before_writing(results, tmp_path, monkeypatch):
    res = results["sgld"]
    monkeypatch.chdir(tmp_path)
    with pytest.raises(ValueError, match=r"path='' must name a file"):
        res.save("")
    with pytest.raises(TypeError, match="path must be a file name .* got None"):
        res.save(None)
    with pytest.raises(IsADirectoryError, match=r"cannot save to .*: it is a folder"):
        res.save(tmp_path)
    assert sorted(p.name for p in tmp_path.iterdir()) == []  # no temporary file left behind
    res.save("llc.nc")
    edited = tmp_path / "edited.nc"
    tree = xr.open_datatree("llc.nc", engine="h5netcdf").load()
    tree.attrs["slt_schema"] = "abc"
    tree.to_netcdf(edited, engine="h5netcdf")
    with pytest.raises(
        ValueError, match=r"edited\.nc is not a result saved by slt \(slt_schema is 'abc'"
    ):
        slt.load(edited)


def test_saves_from_threads_long_names_and_links(results, tmp_path):
    # the temporary file was named after the path and the process: threads of one process
    # collided, and a name near the file system's 255-byte limit could not be saved
    from concurrent.futures import ThreadPoolExecutor

    res = results["sgld"]
    with ThreadPoolExecutor(4) as pool:
        list(pool.map(lambda _: res.save(tmp_path / "same.nc"), range(4)))
    assert slt.load(tmp_path / "same.nc").llc == res.llc
    long = tmp_path / ("r" * 248 + ".nc")  # 251 bytes
    res.save(long)
    assert slt.load(long).llc == res.llc
    (tmp_path / "target.nc").write_bytes(b"")
    (tmp_path / "link.nc").symlink_to(tmp_path / "target.nc")
    res.save(tmp_path / "link.nc")  # writes the target; the link stays a link
    assert (tmp_path / "link.nc").is_symlink() and slt.load(tmp_path / "target.nc").llc == res.llc
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".")]


def test_undecodable_names_and_damaged_files(results, tmp_path):
    # a path from os.fsdecode of non-UTF-8 bytes holds a lone surrogate, which netCDF cannot
    # store: the result of a run that recorded to such a file could not be saved at all
    name = os.fsdecode(b"run\xff.h5")
    res = dataclasses.replace(results["sgld"], per_sample_path=name,
                              warnings=(f"file {name} ok",))  # fmt: skip
    res.save(tmp_path / "odd.nc")
    back = slt.load(tmp_path / "odd.nc")
    assert back.per_sample_path == name and back.warnings == res.warnings
    # one flipped byte in the trace: the checksums refuse it (it loaded other numbers)
    res.save(tmp_path / "ok.nc")
    raw = bytearray((tmp_path / "ok.nc").read_bytes())
    packed = np.asarray(res.trace, dtype=res.trace.dtype).tobytes()
    at = bytes(raw).find(packed[:16])
    assert at > 0
    raw[at + 3] ^= 0x01
    (tmp_path / "bad.nc").write_bytes(bytes(raw))
    with pytest.raises(ValueError, match="is damaged .*checksums fail"):
        slt.load(tmp_path / "bad.nc")


def test_core_import_stays_light():
    heavy = ("xarray", "h5netcdf", "h5py", "safetensors", "slt.io", "slt.checkpoints")
    code = f"import sys, slt; print([m for m in {heavy} if m in sys.modules], callable(slt.load))"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    assert out.stdout.strip() == "[] True"


@dataclasses.dataclass(frozen=True)
class _Local:
    value: float


def test_a_file_never_makes_load_import_outside_slt(extended, tmp_path):
    """Nested dataclasses are rebuilt only from slt's own modules; others stay dicts."""
    io.save(dataclasses.replace(extended, calibration={"x": _Local(0.5)}), tmp_path / "f.nc")
    with pytest.warns(UserWarning, match=r"cannot rebuild .*_Local; kept as a dict"):
        back = io.load(tmp_path / "f.nc")
    assert back.calibration == {"x": {"value": 0.5}}
    assert back.settings == extended.settings and back.candidates == extended.candidates
