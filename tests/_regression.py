"""A Gaussian linear regression at its least-squares minimizer, for calibration tests."""

import numpy as np
import torch


def regression(n=1024, scales=(1.0, 2.0, 0.5), seed=0):
    """Gaussian regression at its least-squares minimizer, H = XᵀX/n known exactly."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(n, len(scales), generator=g) * torch.tensor(scales)
    y = x @ torch.randn(len(scales), 1, generator=g) + torch.randn(n, 1, generator=g)
    model = torch.nn.Linear(len(scales), 1, bias=False)
    with torch.no_grad():
        model.weight.copy_(torch.linalg.lstsq(x, y).solution.T)
    q = np.linalg.eigvalsh((x.T @ x / n).double().numpy())
    return model, torch.utils.data.TensorDataset(x, y), q
