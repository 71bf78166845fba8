"""slt.attention: PyTorch's attention as the batched passes run it."""

import math
import warnings

import pytest
import torch
import torch.nn.functional as F

import slt
from slt import attention
from slt.losses import LossModule
from slt.posterior import Posterior


def _qkv(seed=0, keys=6):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(3, 2, 5, 8, generator=g)
    k, v = torch.randn(2, 3, 2, keys, 8, generator=g).unbind(0)
    return [t.requires_grad_(True) for t in (q, k, v)]


def _masks():
    g = torch.Generator().manual_seed(1)
    keep = torch.rand(5, 6, generator=g) > 0.4
    keep[3] = False  # a row with every key masked
    additive = torch.zeros(5, 6).masked_fill(~keep, -math.inf)
    return {"none": {}, "causal": {"is_causal": True}, "bool": {"attn_mask": keep},
            "additive": {"attn_mask": additive}, "scale": {"scale": 0.3}}  # fmt: skip


@pytest.mark.parametrize("name", list(_masks()))
def test_attention_by_parts_equals_the_math_backend(name):
    options = _masks()[name]
    q, k, v = _qkv()
    ours = attention.attention_by_parts(q, k, v, **options)
    with torch.nn.attention.sdpa_kernel(torch.nn.attention.SDPBackend.MATH):
        theirs = F.scaled_dot_product_attention(q, k, v, **options)
    torch.testing.assert_close(ours, theirs, rtol=1e-5, atol=1e-6)
    weights = torch.randn_like(ours)
    grads = torch.autograd.grad((ours * weights).sum(), (q, k, v))
    expected = torch.autograd.grad((theirs * weights).sum(), (q, k, v))
    for a, b in zip(grads, expected):
        assert torch.isfinite(a).all()
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-5)


def test_only_short_plain_calls_are_computed_by_parts(monkeypatch):
    calls = []

    def counting(*args, **kwargs):
        calls.append(args[1].size(-2))
        return by_parts(*args, **kwargs)

    by_parts = attention.attention_by_parts
    monkeypatch.setattr(attention, "attention_by_parts", counting)
    q, k, v = _qkv(keys=attention.SHORT_KEYS)
    original = F.scaled_dot_product_attention
    with attention.plain_attention():
        F.scaled_dot_product_attention(q, k, v)
        F.scaled_dot_product_attention(*_qkv(keys=attention.SHORT_KEYS + 1))
        F.scaled_dot_product_attention(q, k, v, dropout_p=0.5)
        assert not torch.backends.mha.get_fastpath_enabled()
    F.scaled_dot_product_attention(q, k, v)
    assert calls == [attention.SHORT_KEYS]
    assert torch.backends.mha.get_fastpath_enabled()  # as they were
    assert F.scaled_dot_product_attention is original


def test_every_evaluation_of_an_attention_model_uses_it(monkeypatch):
    # the batched passes (LossModule) and the posterior's own passes (the loop, w*)
    calls = []
    by_parts = attention.attention_by_parts
    monkeypatch.setattr(attention, "attention_by_parts",
                        lambda *a, **kw: calls.append(1) or by_parts(*a, **kw))  # fmt: skip
    layer = torch.nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True).eval()
    model = torch.nn.Sequential(layer, torch.nn.Flatten(), torch.nn.Linear(40, 1))
    batch = (torch.randn(4, 5, 8), torch.randn(4, 1))
    loss_fn = slt.gaussian_nll(1.0)
    with torch.no_grad():
        plain = loss_fn(model, batch)
        assert calls == []
        torch.testing.assert_close(LossModule(model, loss_fn)(batch), plain, rtol=1e-5, atol=1e-6)
        assert calls == [1]
    posterior = Posterior(model, [batch], loss_fn)
    assert len(calls) > 1
    calls.clear()
    posterior.grad_fn(posterior.reset(), batch)
    assert calls == [1]
    assert attention.has_attention(model) and not attention.has_attention(torch.nn.Linear(2, 2))


def test_hessian_vector_products_run_on_long_attention():
    # PyTorch's CPU flash attention, which the loop's passes keep above SHORT_KEYS keys, has
    # no second derivative: calibrate's power iteration raised on such models
    from slt.curvature import top_hessian_eigenvalue

    torch.manual_seed(0)
    layer = torch.nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True).eval()
    keys = attention.SHORT_KEYS + 4
    model = torch.nn.Sequential(layer, torch.nn.Flatten(), torch.nn.Linear(8 * keys, 1))
    batch = (torch.randn(16, keys, 8), torch.randn(16, 1))
    posterior = Posterior(model, [batch], slt.gaussian_nll(1.0))
    eig = top_hessian_eigenvalue(posterior, batch, iters=5)
    assert math.isfinite(eig) and eig > 0


class _PaddedEncoder(torch.nn.Module):
    def __init__(self):
        super().__init__()
        layer = torch.nn.TransformerEncoderLayer(8, 2, 16, dropout=0.0, batch_first=True)
        self.encoder = torch.nn.TransformerEncoder(layer, 2, enable_nested_tensor=True)
        self.head = torch.nn.Linear(8, 1)

    def forward(self, x, pad):
        return self.head(self.encoder(x, src_key_padding_mask=pad)).mean(dim=(1, 2))


def test_loss_at_center_is_the_sampled_loss_not_the_nested_no_grad_path():
    # PyTorch's no-grad eval path packs a padded batch into a nested tensor (zeros at padded
    # positions); slt's L_n(w*) must be the loss its gradient passes compute
    torch.manual_seed(0)
    model = _PaddedEncoder().eval()
    pad = torch.zeros(16, 6, dtype=torch.bool)
    pad[:, 4:] = True
    batch = (torch.randn(16, 6, 8), pad, torch.randn(16))

    def loss_fn(m, b):
        return ((m(b[0], b[1]) - b[2]) ** 2).mean()

    sampled = float(loss_fn(model, batch).detach())
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # PyTorch's note that nested tensors are a prototype
        no_grad = float(loss_fn(model, batch))
    assert abs(sampled - no_grad) > 1e-3  # the two paths differ on this model
    posterior = Posterior(model, [batch], loss_fn)
    assert posterior.init_loss == pytest.approx(sampled, rel=1e-5)


class _CausalSelfAttention(torch.nn.Module):  # attention written by hand, as in nanoGPT
    def __init__(self, width=8, heads=2):
        super().__init__()
        self.heads = heads
        self.qkv = torch.nn.Linear(width, 3 * width)
        self.head = torch.nn.Linear(width, 1)

    def forward(self, x):
        b, t, c = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, c // self.heads).permute(2, 0, 3, 1, 4)
        out = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        return self.head(out.transpose(1, 2).reshape(b, t, c).mean(1))


def test_a_model_calling_sdpa_itself_is_seen_in_its_first_evaluation(monkeypatch):
    calls = []
    by_parts = attention.attention_by_parts
    monkeypatch.setattr(attention, "attention_by_parts",
                        lambda *a, **kw: calls.append(1) or by_parts(*a, **kw))  # fmt: skip
    torch.manual_seed(0)
    batch = (torch.randn(16, 6, 8), torch.randn(16, 1))
    posterior = Posterior(_CausalSelfAttention(), [batch], slt.gaussian_nll(1.0))
    assert posterior.attention  # so the batched passes set attention up too
    calls.clear()
    posterior.grad_fn(posterior.reset(), batch)
    assert calls == [1]
    plain = Posterior(torch.nn.Sequential(torch.nn.Flatten(), torch.nn.Linear(48, 1)), [batch],
                      slt.gaussian_nll(1.0))  # fmt: skip
    assert not plain.attention


def test_overlapping_threads_put_every_switch_back():
    """Two threads inside at once, leaving in the order they entered: the second must not
    restore what the first had switched (which would leave attention swapped for good)."""
    import threading

    from torch.nn.attention import _cur_sdpa_kernel_backends

    before = (F.scaled_dot_product_attention, torch.backends.mha.get_fastpath_enabled(),
              _cur_sdpa_kernel_backends())  # fmt: skip
    first_in, second_in, first_out = threading.Event(), threading.Event(), threading.Event()
    seen = {}

    def first():
        with attention.plain_attention(math_backend=True):
            first_in.set()
            second_in.wait(5)
        first_out.set()

    def second():
        first_in.wait(5)
        with attention.plain_attention(math_backend=False):
            second_in.set()
            first_out.wait(5)
            seen["inside"] = (F.scaled_dot_product_attention,
                              torch.backends.mha.get_fastpath_enabled())  # fmt: skip

    threads = [threading.Thread(target=first), threading.Thread(target=second)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(10)
    assert seen["inside"] == (attention._scaled_dot_product_attention, False)
    after = (F.scaled_dot_product_attention, torch.backends.mha.get_fastpath_enabled(),
             _cur_sdpa_kernel_backends())  # fmt: skip
    assert after == before


class _Encoder(torch.nn.Module):
    """A TransformerEncoderLayer on (batch, T, E) data, batch first or not inside."""

    def __init__(self, batch_first: bool):
        super().__init__()
        self.batch_first = batch_first
        self.layer = torch.nn.TransformerEncoderLayer(8, 2, dim_feedforward=16, dropout=0.0,
                                                      batch_first=batch_first)  # fmt: skip

    def forward(self, x):
        if self.batch_first:
            return self.layer(x)
        return self.layer(x.transpose(0, 1)).transpose(0, 1)


@pytest.mark.parametrize("batch_first", [True, False])
def test_the_activation_count_behind_auto_includes_the_attention_maps(batch_first):
    # the count hooked leaf modules only; nn.MultiheadAttention is not a leaf and its maps
    # (batch × heads × T²) are not an output, so "auto" could batch chains over long
    # sequences whose maps alone were over the cap
    from slt.sampling import build_posterior
    from slt.vmapped import activations

    torch.manual_seed(0)
    model = _Encoder(batch_first).eval()
    counts = {}
    for keys in (8, 64):
        data = torch.utils.data.TensorDataset(torch.randn(64, keys, 8), torch.randn(64, keys, 8))
        loader = torch.utils.data.DataLoader(data, batch_size=32, shuffle=True)
        post = build_posterior(model, loader, slt.gaussian_nll(1.0), n=None, nbeta=None,
                               localization=1.0, control_variate="gradient",
                               sampler="sgld")  # fmt: skip
        batch = next(iter(post.batches.epoch(torch.Generator().manual_seed(0))))
        counts[keys] = activations(post, batch)
    # the maps grow as T², the rest as T: 32 × 2 heads × 64² = 262,144 of them at 64 keys
    assert counts[64] - 8 * counts[8] >= 32 * 2 * (64**2 - 8 * 8**2)
