"""Test-session settings: one intra-op thread. The suite's models are tiny, and on a
2-core machine torch's thread pool costs more than it saves (measured 10-20x slower
full-batch runs when the cores are shared)."""

import torch

torch.set_num_threads(1)
