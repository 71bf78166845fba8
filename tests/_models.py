"""Small models more than one test file uses."""

import torch


class SharedBlock(torch.nn.Module):
    """One submodule applied twice (registered under two names): layer sharing."""

    def __init__(self):
        super().__init__()
        block = torch.nn.Linear(3, 3)
        self.layers = torch.nn.Sequential(block, torch.nn.Tanh(), block)
        self.head = torch.nn.Linear(3, 1)

    def forward(self, x):
        return self.head(self.layers(x))


class PairDataset(torch.utils.data.Dataset):
    """Map-style and not a ``TensorDataset``: the DataLoader path, not slt's fast path."""

    def __init__(self, *tensors):
        self.tensors = tensors

    def __len__(self):
        return len(self.tensors[0])

    def __getitem__(self, i):
        return tuple(t[i] for t in self.tensors)
