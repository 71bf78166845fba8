"""``slt.next_token_nll``: a language model's per-sequence NLL, in the batch forms and model
outputs language models come with."""

import math
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F

import slt

VOCAB = 6


class Bigram(torch.nn.Module):
    def __init__(self):
        super().__init__()
        self.emb = torch.nn.Embedding(VOCAB, 3)
        self.out = torch.nn.Linear(3, VOCAB)

    def forward(self, ids):
        return self.out(self.emb(ids))


class HFLike(Bigram):
    """Returns what a Hugging Face causal LM returns: an output object with .logits."""

    def forward(self, ids):
        return SimpleNamespace(logits=super().forward(ids), past_key_values=None)


def ids(n=24, length=5, seed=0):
    return torch.randint(VOCAB, (n, length), generator=torch.Generator().manual_seed(seed))


def by_hand(model, tokens):
    """Σ over positions of −log p(next token), per sequence."""
    logp = torch.log_softmax(model(tokens), -1)[:, :-1]
    return -logp.gather(-1, tokens[:, 1:, None])[..., 0].sum(1)


def test_per_sequence_sum_of_next_token_nlls_and_its_batch_mean():
    torch.manual_seed(0)
    model, tokens = Bigram(), ids()
    loss = slt.next_token_nll()
    torch.testing.assert_close(loss.per_sample(model, tokens), by_hand(model, tokens))
    torch.testing.assert_close(loss(model, tokens), by_hand(model, tokens).mean())
    # the per-token mean F.cross_entropy gives is this over the 4 positions: 4x colder nβ
    per_token = F.cross_entropy(model(tokens)[:, :-1].transpose(1, 2), tokens[:, 1:])
    torch.testing.assert_close(loss(model, tokens) / 4, per_token)


@pytest.mark.parametrize("form", ["tensor", "tuple", "list", "dict"])
def test_batch_forms_and_an_output_with_logits(form):
    torch.manual_seed(0)
    model, tokens = Bigram(), ids()
    hf = HFLike()
    hf.load_state_dict(model.state_dict())
    mask = torch.ones_like(tokens)
    batch = {"tensor": tokens, "tuple": (tokens,), "list": [tokens],
             "dict": {"input_ids": tokens, "attention_mask": mask}}[form]  # fmt: skip
    want = by_hand(model, tokens).mean()
    torch.testing.assert_close(slt.next_token_nll()(model, batch), want)
    torch.testing.assert_close(slt.next_token_nll()(hf, batch), want)


def test_padding_targets_add_nothing():
    torch.manual_seed(0)
    model, tokens = Bigram(), ids(length=4)
    pad = VOCAB - 1
    tokens[tokens == pad] = 0
    padded = torch.cat([tokens, torch.full((tokens.shape[0], 3), pad)], 1)
    got = slt.next_token_nll(ignore_index=pad).per_sample(model, padded)
    torch.testing.assert_close(got, by_hand(model, tokens))
    assert not torch.allclose(slt.next_token_nll().per_sample(model, padded), got)


def test_what_it_cannot_read_is_named():
    model = Bigram()
    with pytest.raises(
        TypeError, match=r"integer token ids.*torch.float32 tensor of shape \(4, 5\)"
    ):
        slt.next_token_nll()(model, torch.zeros(4, 5))
    with pytest.raises(TypeError, match=r"dict with 'input_ids'; got dict"):
        slt.next_token_nll()(model, {"ids": ids()})
    with pytest.raises(ValueError, match=r"logits must be \(batch, length, vocabulary\)"):
        slt.next_token_nll()(torch.nn.Sequential(Bigram(), torch.nn.Flatten()), ids())
    with pytest.raises(TypeError, match=r"returns logits .*got tuple"):
        slt.next_token_nll()(torch.nn.Sequential(Bigram(), _Pair()), ids())
    with pytest.raises(TypeError, match="ignore_index must be an int or None"):
        slt.next_token_nll(ignore_index=True)


class _Pair(torch.nn.Module):
    def forward(self, x):
        return x, x


@pytest.mark.parametrize("chain_method", ["loop", "vmap"])
def test_an_estimate_with_it_equals_one_with_the_formula_written_out(chain_method, tmp_path):
    torch.manual_seed(0)
    model = Bigram()
    loader = torch.utils.data.DataLoader(torch.utils.data.TensorDataset(ids(64)), batch_size=16,
                                         shuffle=True)  # fmt: skip
    settings = dict(num_chains=2, num_draws=30, num_burnin=5, step_size=1e-4, progress=False,
                    chain_method=chain_method)  # fmt: skip
    ours = slt.estimate_llc(model, loader, slt.next_token_nll(), **settings)
    theirs = slt.estimate_llc(model, loader, lambda m, b: by_hand(m, b[0]).mean(), **settings)
    assert ours.chain_method == chain_method and math.isfinite(ours.llc)
    assert abs(ours.llc - theirs.llc) <= 1e-4 * max(1.0, abs(theirs.llc))
    assert ours.n == 64 and ours.nbeta == pytest.approx(64 / math.log(64))
    if chain_method == "loop":  # per-sample records run in the loop
        recorded = slt.estimate_llc(model, loader, slt.next_token_nll(), record="per_sample",
                                    record_path=tmp_path / "p.h5", **settings)  # fmt: skip
        assert recorded.llc == ours.llc
