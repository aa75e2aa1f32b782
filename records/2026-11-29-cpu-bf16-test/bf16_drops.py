"""test_bf16_autocast_learns_as_fp32_does's setting, before (kernels over 2^20 weights frozen: ResNet-18's layer4) and
after (torchvision's ResNet frozen): the loss drops in fp32 and under CPU bf16 autocast, and the seconds each took,
for every model file and for RetinaNet's v1 head (head_norm False). Run from the repository root:
PYTHONPATH=. python records/2026-11-29-cpu-bf16-test/bf16_drops.py"""
import time

import numpy as np
import torch

import data
import test_models as t

RULES = {"before": lambda key, p: p.numel() <= 2 ** 20, "after": lambda key, p: not t.RESNET.match(key)}
CASES = [(name, {}) for name in t.NAMES] + [("retinanet", {"head_norm": False})]
dataset = data.SyntheticShapes(2, 96, seed=0)
images, targets = data.collate_fn([dataset[0], dataset[1]])
torch.set_num_threads(2)
for name, extra in CASES:
    for rule, trains in RULES.items():
        lr, steps = t.REGISTRY[name].sgd
        drops, seconds = [], []
        for dtype in (torch.float32, torch.bfloat16):
            start = time.time()
            torch.manual_seed(0)
            model = t.REGISTRY[name].module.DETECTOR(t.tiny_config(name, **t.REGISTRY[name].bf16, **extra)).train()
            for key, p in model.named_parameters():
                p.requires_grad_(p.requires_grad and trains(key, p))
            optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=lr, momentum=0.9)
            losses = []
            for _ in range(steps):
                with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
                    loss = sum(model(images, targets).values())
                optimizer.zero_grad()
                loss.backward()
                optimizer.step()
                losses.append(loss.item())
            drops.append(1 - np.mean(losses[-5:]) / np.mean(losses[:2]))
            seconds.append(time.time() - start)
        print(f"{name} {extra or ''} {rule}: drop fp32 {drops[0]:.3f} bf16 {drops[1]:.3f}, "
              f"seconds fp32 {seconds[0]:.1f} bf16 {seconds[1]:.1f}", flush=True)
