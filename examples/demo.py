"""Demo: convert a small model to block-sparse and low-rank layers and print the reports.

    python examples/demo.py
"""

from __future__ import annotations

import torch
from torch import nn

import sparsify


class Classifier(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Linear(512, 1024)
        self.norm = nn.BatchNorm1d(1024)
        self.hidden = nn.Linear(1024, 1024)
        self.out = nn.Linear(1024, 10)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h = torch.relu(self.norm(self.embed(x)))
        h = h + torch.nn.functional.gelu(self.hidden(h))
        return self.out(h)


def main() -> None:
    torch.manual_seed(0)
    model = Classifier().eval()
    x = torch.randn(8, 512)

    sparse = sparsify.sparsify(model, method="block_sparse", density=0.25, block_size=32, example_inputs=(x,))
    print("== block-sparse, density 0.25, blocks of 32 ==")
    print(sparsify.report(sparse))

    with torch.no_grad():
        y, y_ref = sparse(x), sparsify.densify(sparse)(x)
    err = float((y - y_ref).norm() / y_ref.norm())
    print(f"\nconverted vs densify(converted): relative error {err:.2e}")
    assert err < 1e-5, err

    sparse.train()
    sparse(x).square().mean().backward()  # it trains: gradients for the stored blocks only
    print("gradient of the stored blocks of 'hidden':", tuple(sparse.hidden.values.grad.shape))

    low = sparsify.sparsify(model, method="low_rank", rank=0.25, example_inputs=(x,))
    print("\n== low rank, a quarter of min(in, out) ==")
    print(sparsify.report(low))


if __name__ == "__main__":
    main()
