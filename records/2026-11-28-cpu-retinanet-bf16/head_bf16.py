import numpy as np, torch, data, test_models as T, retinanet  # run from the repository root: PYTHONPATH=. python records/2026-11-28-cpu-retinanet-bf16/head_bf16.py
torch.set_num_threads(2)
dataset = data.SyntheticShapes(2, 96, seed=0)
images, targets = data.collate_fn([dataset[0], dataset[1]])
for norm in (True, False):
    drops = []
    for dtype in (torch.float32, torch.bfloat16):
        torch.manual_seed(0)
        model = retinanet.RetinaNet(T.tiny_config("retinanet", head_norm=norm)).train()
        for p in model.parameters():
            p.requires_grad_(p.requires_grad and p.numel() <= 2 ** 20)
        opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.01, momentum=0.9)
        losses = []
        for _ in range(20):
            with torch.autocast("cpu", dtype=dtype, enabled=dtype != torch.float32):
                loss = sum(model(images, targets).values())
            opt.zero_grad(); loss.backward(); opt.step(); losses.append(loss.item())
        drops.append(1 - np.mean(losses[-5:]) / np.mean(losses[:2]))
    print("head_norm", norm, "drops", np.round(drops, 3))
features = [torch.randn(1, 256, 8, 8), torch.randn(1, 256, 4, 4)]
for norm in (False, True):
    torch.manual_seed(0)
    head = retinanet.Head(256, 9, 6, 0.01, norm)
    with torch.no_grad():
        l32, _ = head(features)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            l16, _ = head(features)
    print("norm", norm, "numel", l16.numel(), "distinct bf16", l16.unique().numel(), "fp32 std", l32.std().item())
