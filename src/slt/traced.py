"""Gradient passes replayed from a traced graph of ATen operations: the vmapped step's, and
the loop's (:meth:`slt.posterior.Posterior.replayed`) for small models in long runs.

For a small model the eager vmapped pass — ``vmap`` of ``functional_call``, then an autograd
backward — spends most of its time in Python: flattening arguments, swapping the module's
parameters, the batching rules' dispatch, the autograd engine. ``make_fx`` records the
operations one call runs (forward, batching and backward) as an FX graph, and replaying
the graph runs those same operations with none of that overhead. Measured on one CPU
thread, the pass of a 10-parameter regression at 12 stacked chains took 205 µs against
405 µs eager, a 300-parameter reduced rank regression at 8 took 311 against 588, a 10k
ReLU MLP at 8 took 1.73 ms against 2.11 (the rest of its step is arithmetic).

Nothing here is compiled (that is ``compile=True``, :mod:`slt.compiled`): the graph holds
the eager operations, so its numbers are the eager pass's. Each graph is checked bit for bit
against the eager pass on its first use in a run: a graph kept from an earlier run that
differs is traced again, one that still differs is not used; a function that cannot be
traced (data-dependent Python control flow, a tensor the graph was not given) runs eagerly.
Tracing is on ``fake`` tensors, so any tensor the function reads must be one of its
arguments: the vmapped step passes every parameter and buffer of the model.

A graph is specialised to its arguments' shapes, dtypes and devices, and holds as constants
whatever plain Python values the traced code read (a layer's sizes, a loss's σ). Graphs are
kept for the life of the process, keyed by the argument signature and a fingerprint of
that Python state (:func:`fingerprint`), so the next estimate of the same architecture —
the next training checkpoint, the next step size — reuses them; where the state cannot be
fingerprinted (a closure, an arbitrary object attribute) the graph lives for one run.
Tracing costs ~0.05-0.2 s per graph, and the first trace in a process imports
``torch._dynamo`` (~1.3 s, once), so runs shorter than :data:`MIN_STEPS` trace nothing:
they replay a graph an earlier run left, if there is one, and otherwise run eagerly.

``slt.traced.enabled = False`` turns tracing off (every vmapped step then runs eagerly).
"""

from __future__ import annotations

import functools
import threading
import types
from collections import OrderedDict
from collections.abc import Callable, Iterable
from contextlib import contextmanager
from typing import Any

import torch
from torch.utils import _pytree as pytree

enabled = True
MIN_STEPS = 500  # shorter vmapped runs do not trace (see the module docstring)
traces = 0  # graphs traced so far in this process (tests count them)
reuses = 0  # graphs taken from an earlier run, checked and used
_CACHE_SIZE = 64
_CACHE: OrderedDict[tuple, _Replay | None] = OrderedDict()  # None: could not be traced
_LOCK = threading.Lock()  # one trace at a time: make_fx keeps global tracing state
_PLAIN = (type(None), bool, int, float, complex, str, torch.dtype, torch.device, torch.Size)
_HOOKS = ("_forward_hooks", "_forward_pre_hooks", "_backward_hooks", "_backward_pre_hooks")
_MODULE_OWN = {"_parameters", "_buffers", "_modules"}


class TracedPass:
    """``fn(batch, *tensors)`` replayed from one traced graph per argument signature.

    ``key``: a hashable fingerprint of the Python state ``fn`` reads (see
    :func:`fingerprint`), or None to keep the graphs for this object's life only. With
    ``trace=False`` only graphs kept from earlier runs are used (a short run gains from
    them but would not repay a trace of its own); otherwise ``fn`` runs eagerly. Within
    one object the tensors after ``batch`` must keep their shapes, dtypes and devices from
    call to call (a run's parameters do), so a call looks its graph up by the batch's
    shapes alone. ``eager``, if given, runs instead of ``fn`` where there is no graph: a
    function that gives the same numbers by another, cheaper path when not traced (the
    loop's pass through the model's own call, not ``functional_call``); a graph is checked
    against it. ``state()`` (default: the fingerprint of ``module``) snapshots the plain
    Python state the pass reads: where the eager pass changes it, no graph is used."""

    def __init__(
        self,
        fn: Callable,
        key: Any = None,
        *,
        trace: bool = True,
        module: torch.nn.Module | None = None,
        eager: Callable | None = None,
        state: Callable[[], Any] | None = None,
    ):
        self.fn = fn
        self.eager = fn if eager is None else eager  # what runs where no graph does
        self.state = state or (lambda: None if module is None else fingerprint(module))
        self.key = key
        self.trace = trace
        self.module = module  # what fn runs: its attributes are restored after each trace
        self._graphs: dict[Any, _Replay | None] = {}

    def __call__(self, batch: Any, *tensors: torch.Tensor) -> Any:
        if isinstance(batch, (list, tuple)) and all(isinstance(b, torch.Tensor) for b in batch):
            quick, leaves = tuple(b.shape for b in batch), batch
        else:
            quick, leaves = _signature((batch,)), None
        graph = self._graphs.get(quick, False)
        if graph is False:
            args = (batch, *tensors)
            graph, result = self._first_use(_signature(args), args)
            self._graphs[quick] = graph
            return result
        if graph is None:
            return self.eager(batch, *tensors)
        if leaves is None:
            leaves = pytree.tree_leaves(batch)
        return graph.flat(*leaves, *tensors)

    def _first_use(self, signature: tuple, args: tuple) -> tuple[_Replay | None, Any]:
        """The graph for ``signature`` (shared, or traced now) if it reproduces the eager
        result on ``args`` exactly, else None; and the eager result. A shared graph that
        does not (Python state the fingerprint missed) is traced again. No graph where the
        eager pass changes the module's plain Python state."""
        global reuses
        key = None if self.key is None else (self.key, signature)
        with _LOCK:
            graph = _CACHE.get(key, False) if key is not None else False
        shared = graph is not False
        if not shared and not self.trace:
            return None, self.eager(*args)
        if not shared:
            with _LOCK:
                graph = _trace(self.fn, args, self.module)
        before = [t.clone() for t in args[1:]]  # a forward may update a buffer in place
        state = self.state()
        result = self.eager(*args)
        if self.state() != state:
            # the pass changes the module's Python state (a counter the forward reads): a
            # graph would replay the value it held at tracing at every step
            graph = None
        check = _Check(args, before, result)
        if graph is not None and not check(graph):
            graph = None
            if shared and self.trace:
                with _LOCK:
                    graph = _trace(self.fn, args, self.module)
                if graph is not None and not check(graph):
                    graph = None
        elif shared and graph is not None:
            with _LOCK:
                reuses += 1
        if key is not None and self.trace:  # a short run leaves the shared graphs as they are
            with _LOCK:
                _remember(key, graph)
        return graph, result


class _Check:
    """``check(graph)``: whether ``graph`` reproduces the eager pass that turned the tensors
    after the batch from ``before`` into their values now and returned ``result``, run from
    ``before`` too. Without that a forward that updates a buffer in place (a counter, a
    running statistic) would update it once more on a first use, and the graph, seeing the
    updated buffer, would fail its check or give other numbers. The tensors are left as the
    eager pass left them."""

    def __init__(self, args: tuple, before: list[torch.Tensor], result: Any):
        self.args, self.result = args, result
        changed = [i for i, (t, b) in enumerate(zip(args[1:], before)) if not _equal(t, b)]
        self.changed = [(args[1 + i], before[i], args[1 + i].clone()) for i in changed]

    def __call__(self, graph: _Replay) -> bool:
        with torch.no_grad(), _random_state_kept(self.args):
            for tensor, before, _ in self.changed:
                tensor.copy_(before)
            try:
                same = _same(graph(*self.args), self.result)
            except Exception:  # a graph that records but does not replay (an LSTM's kernel
                same = False  # whose workspace the trace left undefined): not used
            for tensor, _, after in self.changed:
                same = same and _equal(tensor, after)
                tensor.copy_(after)
        return same


class _Replay:
    """A traced graph: ``replay(*args)`` as ``fn(*args)``, and ``replay.flat(*leaves)`` on
    the arguments' tensors in ``pytree`` order, which skips the per-call flattening of
    the arguments (the graph's own code is regenerated without it)."""

    def __init__(self, graph: torch.fx.GraphModule):
        self.graph = graph
        info = getattr(graph.graph._codegen, "pytree_info", None)  # None: flat arguments
        self._out_spec = None if info is None else info.out_spec
        if info is not None:
            graph.graph._codegen = torch.fx.graph.CodeGen()  # positional tensors in, a list out
            graph.recompile()
        self._forward = graph.forward

    def __call__(self, *args: Any) -> Any:
        return self.flat(*pytree.tree_leaves(args))

    def flat(self, *leaves: torch.Tensor) -> Any:
        out = self._forward(*leaves)
        return out if self._out_spec is None else pytree.tree_unflatten(out, self._out_spec)


def _trace(fn: Callable, args: tuple, module: torch.nn.Module | None = None) -> _Replay | None:
    global traces
    from torch.fx.experimental.proxy_tensor import make_fx

    try:
        with _attributes_kept(module), _random_state_kept(args):
            graph = make_fx(fn, tracing_mode="fake")(*args)
        _drop_no_ops(graph)
        replay = _Replay(graph)
    except Exception:  # untraceable: data-dependent control flow, a tensor not passed in, ...
        return None
    traces += 1
    return replay


def _random_state_kept(args: tuple):
    """Restores torch's global random state (CPU, and the CUDA devices of ``args``) after a
    trace or a check: a pass that draws from it (an always-on dropout) then draws the same
    numbers with or without tracing, and in the first run to trace a model as in later ones
    (its graph fails the check and the pass runs eagerly)."""
    devices = {t.device.index or 0 for t in pytree.tree_leaves(args)
               if isinstance(t, torch.Tensor) and t.device.type == "cuda"}  # fmt: skip
    return torch.random.fork_rng(devices=sorted(devices))


@contextmanager
def _attributes_kept(module: torch.nn.Module | None):
    """Restores every submodule's attributes (its buffers included) as they were: a
    forward that stores a tensor on its module (a cache built on first use) would leave a
    fake tensor of the trace there. (Parameters that ``functional_call`` leaves behind in a
    shared submodule: :func:`slt.passes.swapped_call`.)"""
    if module is None:
        yield
        return
    restore = attributes_restorer(module.modules())
    try:
        yield
    finally:
        restore()


def attributes_restorer(modules: Iterable[torch.nn.Module]) -> Callable[[], None]:
    """A function that puts every attribute of ``modules`` (their buffers' entries too)
    back as it is now: new ones deleted, replaced ones restored (not values changed in
    place)."""
    saved = [(m, dict(vars(m)), dict(m._buffers)) for m in modules]

    def restore() -> None:
        for m, attributes, buffers in saved:
            for name in [k for k in vars(m) if k not in attributes]:
                delattr(m, name)
            vars(m).update(attributes)
            m._buffers.clear()
            m._buffers.update(buffers)

    return restore


def _drop_no_ops(graph: torch.fx.GraphModule) -> None:
    """Removes the operations that change nothing when replayed without autograd: detach,
    and views or expansions to the shape their input already has (vmap's batching rules
    emit many). Each costs a dispatch — several µs, a sizeable share of a small model's
    pass. A node the graph returns is kept, so no output is one of the inputs."""
    aten = torch.ops.aten
    reshapes = {aten.view.default, aten._unsafe_view.default, aten.expand.default,
                aten.reshape.default}  # fmt: skip
    returned = {a for out in graph.graph.find_nodes(op="output") for a in out.all_input_nodes}
    for node in list(graph.graph.nodes):
        if node.op != "call_function" or node in returned:
            continue
        source = node.args[0] if node.args else None
        if not isinstance(source, torch.fx.Node):
            continue
        if node.target is aten.detach.default:
            same = True
        elif node.target in reshapes:
            same = _same_layout(source.meta.get("val"), node.meta.get("val"))
        else:
            same = False
        if same:
            node.replace_all_uses_with(source)
            graph.graph.erase_node(node)
    graph.recompile()


def _remember(key: tuple, graph: _Replay | None) -> None:
    _CACHE[key] = graph
    _CACHE.move_to_end(key)
    while len(_CACHE) > _CACHE_SIZE:
        _CACHE.popitem(last=False)


def _signature(args: tuple) -> tuple:
    leaves, spec = pytree.tree_flatten(args)
    return (spec, *(_leaf(x) for x in leaves))


def _leaf(x: Any) -> Any:
    if isinstance(x, torch.Tensor):
        return (tuple(x.shape), x.dtype, x.device, x.requires_grad)
    return x if isinstance(x, _PLAIN) else id(x)


def _same(a: Any, b: Any) -> bool:
    left, left_spec = pytree.tree_flatten(a)
    right, right_spec = pytree.tree_flatten(b)
    if left_spec != right_spec:
        return False
    return all(
        torch.equal(x, y) if isinstance(x, torch.Tensor) and isinstance(y, torch.Tensor) else x == y
        for x, y in zip(left, right)
    )


def _equal(a: torch.Tensor, b: torch.Tensor) -> bool:
    """Bit for bit, a NaN equal to a NaN (a buffer may hold NaNs that no pass changed)."""
    if torch.equal(a, b):
        return True
    return a.is_floating_point() and bool(torch.isclose(a, b, rtol=0, atol=0, equal_nan=True).all())


def _same_layout(a: Any, b: Any) -> bool:
    return (
        isinstance(a, torch.Tensor)
        and isinstance(b, torch.Tensor)
        and a.shape == b.shape
        and a.stride() == b.stride()
    )


def has_hooks(module: torch.nn.Module) -> bool:
    """Whether ``module`` or a submodule, or every module (global hooks), has forward or
    backward hooks: a traced graph would run them once, at tracing, instead of every step."""
    from torch.nn.modules import module as nn_module

    global_hooks = ("_global_forward_hooks", "_global_forward_pre_hooks",
                    "_global_backward_hooks", "_global_backward_pre_hooks")  # fmt: skip
    if any(getattr(nn_module, name, None) for name in global_hooks):
        return True
    return any(getattr(m, name, None) for m in module.modules() for name in _HOOKS)


def fingerprint(obj: Any) -> Any:
    """A hashable summary of the plain Python state a traced graph of ``obj`` could hold as
    constants, or None where some of it is not plain.

    A module: per submodule, its class and every attribute but its parameters, buffers and
    children, which must be plain values (numbers, strings, dtypes, tuples of them, ...),
    functions without closures or classes (compared by identity). A loss function: an
    object's class and attributes by the same rule, or a function without a closure."""
    if isinstance(obj, torch.nn.Module):
        parts = []
        for name, m in obj.named_modules():
            state = _plain({k: v for k, v in vars(m).items() if k not in _MODULE_OWN})
            if state is None:
                return None
            parts.append((name, type(m), state))
        return tuple(parts)
    if isinstance(obj, types.FunctionType):
        return obj if obj.__closure__ is None else None
    if isinstance(obj, functools.partial):  # its arguments live in slots, not __dict__
        parts = (fingerprint(obj.func), _plain(obj.args), _plain(obj.keywords))
        return None if None in parts else (functools.partial, *parts)
    own = getattr(obj, "__dict__", None)
    state = _plain(own) if isinstance(own, dict) else None
    return None if state is None else (type(obj), state)


def _plain(value: Any) -> Any:
    """``value`` as a hashable of plain values, or None if it holds anything else."""
    if isinstance(value, _PLAIN):
        return value
    if isinstance(value, (types.FunctionType, types.BuiltinFunctionType)):
        return value if getattr(value, "__closure__", None) is None else None
    if isinstance(value, type):
        return value
    if isinstance(value, (set, frozenset)):
        value = sorted(value, key=repr)
    if isinstance(value, (tuple, list)):
        items = [_plain(v) for v in value]
        if any(i is None and v is not None for i, v in zip(items, value)):
            return None
        return (type(value), tuple(items))
    if isinstance(value, dict):
        items = [(k, _plain(v)) for k, v in value.items()]
        if any(not isinstance(k, str) or (p is None and value[k] is not None) for k, p in items):
            return None
        return (dict, tuple(sorted(items, key=lambda kv: kv[0])))
    return None
