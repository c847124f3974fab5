"""Semantic segmentation of synthetic indoor scenes with a MinkUNet, MinkowskiEngine style.

This is a MinkowskiEngine training script; only the two import lines marked below
differ from what it would be with MinkowskiEngine installed:

    import MinkowskiEngine as ME                                   # before
    from MinkowskiEngine.modules.resnet_block import BasicBlock
    import sparsify.spatial as ME                                  # after
    from sparsify.spatial.modules.resnet_block import BasicBlock

Each scene is a room (floor, walls) with boxes and spheres; every point is labelled
floor / wall / box / sphere and coloured with noise.  Points are voxelized with
``sparse_quantize`` into a batch of sparse tensors (through a ``TensorField`` so the
predictions are sliced back to every point), and a MinkUNet14 is trained with SGD.

    python examples/minkunet_segmentation.py --iters 200            # a real run
    python examples/minkunet_segmentation.py --iters 2 --points 3000 --planes 8   # smoke test
"""

from __future__ import annotations

import argparse
import time

import numpy as np
import torch
import torch.nn as nn
from torch.optim import SGD

# The import lines (were: import MinkowskiEngine as ME;
#                          from MinkowskiEngine.modules.resnet_block import BasicBlock)
import sparsify.spatial as ME
from sparsify.spatial.modules.resnet_block import BasicBlock

CLASSES = ("floor", "wall", "box", "sphere")


# ----------------------------------------------------------------------------- data
def synthetic_scene(rng: np.random.Generator, n_points: int, room: float = 4.0, height: float = 2.5):
    """Points on the surfaces of a room with boxes and spheres; (xyz, rgb, label)."""
    per = n_points // 6
    pts, labels = [], []
    floor = np.c_[rng.uniform(0, room, (per, 2)), np.zeros(per)]
    pts.append(floor)
    labels.append(np.zeros(per, np.int64))
    for wall in range(2):
        u = rng.uniform(0, 1, (per // 2, 2))
        w = np.c_[u[:, 0] * room, np.full(per // 2, wall * room), u[:, 1] * height]
        pts += [w, w[:, [1, 0, 2]]]
        labels += [np.ones(per // 2, np.int64)] * 2
    for _ in range(3):  # boxes standing on the floor
        size = rng.uniform(0.3, 1.0, 3)
        corner = np.r_[rng.uniform(0.2, room - 1.2, 2), 0.0]
        face = rng.integers(0, 3, per // 3)
        p = rng.uniform(0, 1, (per // 3, 3))
        p[np.arange(len(p)), face] = rng.integers(0, 2, len(p))
        pts.append(corner + p * size)
        labels.append(np.full(per // 3, 2, np.int64))
    for _ in range(2):  # spheres
        centre = np.r_[rng.uniform(0.5, room - 0.5, 2), rng.uniform(0.3, 1.5)]
        v = rng.normal(size=(per // 2, 3))
        pts.append(centre + rng.uniform(0.2, 0.4) * v / np.linalg.norm(v, axis=1, keepdims=True))
        labels.append(np.full(per // 2, 3, np.int64))
    xyz = np.concatenate(pts).astype(np.float32)
    label = np.concatenate(labels)
    palette = np.array([[0.5, 0.4, 0.3], [0.8, 0.8, 0.8], [0.2, 0.4, 0.8], [0.8, 0.2, 0.2]], np.float32)
    rgb = palette[label] + rng.normal(0, 0.1, (len(label), 3)).astype(np.float32)
    return xyz, rgb, label


def make_batch(rng, batch_size: int, n_points: int, voxel_size: float):
    """A TensorField of the batch's points (coordinates in voxel units) and their labels."""
    coords, feats, labels = [], [], []
    for _ in range(batch_size):
        xyz, rgb, label = synthetic_scene(rng, n_points)
        coords.append(torch.from_numpy(xyz / voxel_size))
        feats.append(torch.from_numpy(rgb))
        labels.append(torch.from_numpy(label))
    bcoords = ME.utils.batched_coordinates(coords, dtype=torch.float32)
    field = ME.TensorField(features=torch.cat(feats), coordinates=bcoords,
                           quantization_mode=ME.SparseTensorQuantizationMode.UNWEIGHTED_AVERAGE)
    return field, torch.cat(labels)


# ----------------------------------------------------------------------------- model
class ResNetBase(ME.MinkowskiNetwork):
    BLOCK = None
    LAYERS = ()
    INIT_DIM = 32
    PLANES = (32, 64, 128, 256, 256, 128, 96, 96)

    def __init__(self, in_channels, out_channels, D=3):
        super().__init__(D)
        self.network_initialization(in_channels, out_channels, D)

    def _make_layer(self, block, planes, blocks, stride=1, dilation=1, bn_momentum=0.1):
        downsample = None
        if stride != 1 or self.inplanes != planes * block.expansion:
            downsample = nn.Sequential(
                ME.MinkowskiConvolution(self.inplanes, planes * block.expansion, kernel_size=1, stride=stride,
                                        dimension=self.D),
                ME.MinkowskiBatchNorm(planes * block.expansion),
            )
        layers = [block(self.inplanes, planes, stride=stride, dilation=dilation, downsample=downsample,
                        dimension=self.D)]
        self.inplanes = planes * block.expansion
        for _ in range(1, blocks):
            layers.append(block(self.inplanes, planes, stride=1, dilation=dilation, dimension=self.D))
        return nn.Sequential(*layers)


class MinkUNetBase(ResNetBase):
    def network_initialization(self, in_channels, out_channels, D):
        P = self.PLANES
        self.inplanes = self.INIT_DIM
        self.conv0p1s1 = ME.MinkowskiConvolution(in_channels, self.inplanes, kernel_size=5, dimension=D)
        self.bn0 = ME.MinkowskiBatchNorm(self.inplanes)
        self.conv1p1s2 = ME.MinkowskiConvolution(self.inplanes, self.inplanes, kernel_size=2, stride=2, dimension=D)
        self.bn1 = ME.MinkowskiBatchNorm(self.inplanes)
        self.block1 = self._make_layer(self.BLOCK, P[0], self.LAYERS[0])
        self.conv2p2s2 = ME.MinkowskiConvolution(self.inplanes, self.inplanes, kernel_size=2, stride=2, dimension=D)
        self.bn2 = ME.MinkowskiBatchNorm(self.inplanes)
        self.block2 = self._make_layer(self.BLOCK, P[1], self.LAYERS[1])
        self.conv3p4s2 = ME.MinkowskiConvolution(self.inplanes, self.inplanes, kernel_size=2, stride=2, dimension=D)
        self.bn3 = ME.MinkowskiBatchNorm(self.inplanes)
        self.block3 = self._make_layer(self.BLOCK, P[2], self.LAYERS[2])
        self.conv4p8s2 = ME.MinkowskiConvolution(self.inplanes, self.inplanes, kernel_size=2, stride=2, dimension=D)
        self.bn4 = ME.MinkowskiBatchNorm(self.inplanes)
        self.block4 = self._make_layer(self.BLOCK, P[3], self.LAYERS[3])
        self.convtr4p16s2 = ME.MinkowskiConvolutionTranspose(self.inplanes, P[4], kernel_size=2, stride=2, dimension=D)
        self.bntr4 = ME.MinkowskiBatchNorm(P[4])
        self.inplanes = P[4] + P[2] * self.BLOCK.expansion
        self.block5 = self._make_layer(self.BLOCK, P[4], self.LAYERS[4])
        self.convtr5p8s2 = ME.MinkowskiConvolutionTranspose(self.inplanes, P[5], kernel_size=2, stride=2, dimension=D)
        self.bntr5 = ME.MinkowskiBatchNorm(P[5])
        self.inplanes = P[5] + P[1] * self.BLOCK.expansion
        self.block6 = self._make_layer(self.BLOCK, P[5], self.LAYERS[5])
        self.convtr6p4s2 = ME.MinkowskiConvolutionTranspose(self.inplanes, P[6], kernel_size=2, stride=2, dimension=D)
        self.bntr6 = ME.MinkowskiBatchNorm(P[6])
        self.inplanes = P[6] + P[0] * self.BLOCK.expansion
        self.block7 = self._make_layer(self.BLOCK, P[6], self.LAYERS[6])
        self.convtr7p2s2 = ME.MinkowskiConvolutionTranspose(self.inplanes, P[7], kernel_size=2, stride=2, dimension=D)
        self.bntr7 = ME.MinkowskiBatchNorm(P[7])
        self.inplanes = P[7] + self.INIT_DIM
        self.block8 = self._make_layer(self.BLOCK, P[7], self.LAYERS[7])
        self.final = ME.MinkowskiConvolution(P[7] * self.BLOCK.expansion, out_channels, kernel_size=1, bias=True,
                                             dimension=D)
        self.relu = ME.MinkowskiReLU(inplace=True)

    def forward(self, x):
        out_p1 = self.relu(self.bn0(self.conv0p1s1(x)))
        out = self.relu(self.bn1(self.conv1p1s2(out_p1)))
        out_b1p2 = self.block1(out)
        out = self.relu(self.bn2(self.conv2p2s2(out_b1p2)))
        out_b2p4 = self.block2(out)
        out = self.relu(self.bn3(self.conv3p4s2(out_b2p4)))
        out_b3p8 = self.block3(out)
        out = self.relu(self.bn4(self.conv4p8s2(out_b3p8)))  # tensor_stride=16
        out = self.block4(out)
        out = self.relu(self.bntr4(self.convtr4p16s2(out)))  # tensor_stride=8
        out = self.block5(ME.cat(out, out_b3p8))
        out = self.relu(self.bntr5(self.convtr5p8s2(out)))  # tensor_stride=4
        out = self.block6(ME.cat(out, out_b2p4))
        out = self.relu(self.bntr6(self.convtr6p4s2(out)))  # tensor_stride=2
        out = self.block7(ME.cat(out, out_b1p2))
        out = self.relu(self.bntr7(self.convtr7p2s2(out)))  # tensor_stride=1
        out = self.block8(ME.cat(out, out_p1))
        return self.final(out)


class MinkUNet14(MinkUNetBase):
    BLOCK = BasicBlock
    LAYERS = (1, 1, 1, 1, 1, 1, 1, 1)


# ----------------------------------------------------------------------------- training
def mean_iou(pred: torch.Tensor, label: torch.Tensor, n: int) -> float:
    ious = []
    for c in range(n):
        inter = ((pred == c) & (label == c)).sum().item()
        union = ((pred == c) | (label == c)).sum().item()
        if union:
            ious.append(inter / union)
    return float(np.mean(ious))


def main(argv=None) -> dict:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--iters", type=int, default=200)
    parser.add_argument("--batch-size", type=int, default=2)
    parser.add_argument("--points", type=int, default=20000, help="points per scene")
    parser.add_argument("--voxel-size", type=float, default=0.05)
    parser.add_argument("--planes", type=int, default=0, help="shrink every width to this (0: MinkUNet14's widths)")
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    torch.manual_seed(args.seed)
    rng = np.random.default_rng(args.seed)
    if args.planes:
        MinkUNet14.INIT_DIM = args.planes
        MinkUNet14.PLANES = (args.planes,) * 8
    net = MinkUNet14(in_channels=3, out_channels=len(CLASSES), D=3)
    optimizer = SGD(net.parameters(), lr=args.lr, momentum=0.9, weight_decay=1e-4)
    criterion = nn.CrossEntropyLoss()

    history = []
    net.train()
    for it in range(args.iters):
        t0 = time.perf_counter()
        field, label = make_batch(rng, args.batch_size, args.points, args.voxel_size)
        sinput = field.sparse()
        soutput = net(sinput)
        logits = soutput.slice(field).F  # back to every point
        loss = criterion(logits, label)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        miou = mean_iou(logits.argmax(1), label, len(CLASSES))
        history.append({"iter": it, "loss": loss.item(), "miou": miou, "voxels": len(sinput),
                        "seconds": time.perf_counter() - t0})
        print(f"iter {it:4d}  loss {loss.item():.4f}  mIoU {miou:.3f}  voxels {len(sinput):6d}  "
              f"{history[-1]['seconds']:.2f} s", flush=True)
    return {"history": history}


if __name__ == "__main__":
    main()
