"""What makes a GPU wait in one step of a model file against torchvision's model (same converted weights, synthetic
images, CPU, torch.profiler): boolean selections (nonzero), .item() (_local_scalar_dense), NMS calls (each copies its
mask to the host), tensors made from Python numbers, and kernel-like operators (leaves of the profiler's tree, less
views and allocations). Train step = forward + backward; inference = eval forward.
    python records/2026-11-29-cpu-frcnn-waits/count_waits_tv.py faster_rcnn 128 16 [REPO]   # REPO: another checkout
`profile` also serves ../2026-11-29-cpu-detr-ops/count_detr_ops.py."""
import collections
import importlib
import os
import sys

import torch

NOT_KERNELS = {"empty", "empty_strided", "as_strided", "view", "_reshape_alias", "resize_", "lift_fresh", "to",
               "detach", "alias", "t", "transpose", "expand", "unsqueeze", "select", "slice", "as_strided_",
               "_unsafe_view", "permute", "split", "unbind", "chunk", "reshape", "squeeze", "narrow", "empty_like",
               "detach_", "set_", "result_type", "_has_compatible_shallow_copy_type", "is_nonzero"}


def profile(fn):
    """One call of fn after a warm-up call: (its kernel-like operators counted by name, all its profiler events)."""
    fn()
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn()
    memo = {}

    def kernel(e):  # an aten operator none of whose descendants is one
        if id(e) not in memo:
            op = e.name.startswith("aten::") and e.name[6:] not in NOT_KERNELS
            memo[id(e)] = op and not any([kernel(c) for c in e.cpu_children])
        return memo[id(e)]
    events = prof.events()
    return collections.Counter(e.name[6:] for e in events if kernel(e)), events


def main():
    here = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # this checkout
    root = sys.argv[4] if len(sys.argv) > 4 else here
    sys.path.insert(0, root)
    import torchvision
    import bench
    import data
    torch.set_num_threads(2)
    name, S, B = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
    module = importlib.import_module(name)
    dataset = data.SyntheticShapes(B, S, seed=0)
    images = [dataset[i][0] for i in range(B)]
    targets = [{k: dataset[i][1][k] for k in ("boxes", "labels")} for i in range(B)]
    fields = module.Config.__dataclass_fields__
    sizes = dict(min_size=S, max_size=S) if "min_size" in fields else {}
    tv = getattr(torchvision.models.detection, bench.MODELS[name])(weights=None, weights_backbone=None,
                                                                    num_classes=91, **sizes)
    plain_bn = dict(frozen_bn=False, bn_eps=1e-5) if "frozen_bn" in fields else {}
    ours = module.DETECTOR(module.Config(**{**module.TORCHVISION_CONFIG, **plain_bn, "num_classes": 91, **sizes}))
    ours.load_state_dict(module.convert_torchvision(tv.state_dict()))

    def train(model):
        model.train()
        sum(model(images, targets).values()).backward()

    def infer(model):
        model.eval()
        with torch.no_grad():
            model(images)

    print(f"{name} ({root}), {S} px, batch {B}; torch {torch.__version__}, torchvision {torchvision.__version__}")
    print(f"{'':24} {'selections':>10} {'.item()':>8} {'NMS':>5} {'tensors from numbers':>21} {'kernel-like ops':>16}")
    for label, fn in (("train step", train), ("inference", infer)):
        for who, model in ((f"{name}.py", ours), ("torchvision", tv)):
            names, events = profile(lambda: fn(model))
            counts = (names["nonzero"], names["_local_scalar_dense"], sum(e.name == "torchvision::nms" for e in events),
                      sum(e.name == "aten::lift_fresh" for e in events), sum(names.values()))
            print(f"{label + ', ' + who:24} " + " ".join(f"{n:>{w}}" for n, w in zip(counts, (10, 8, 5, 21, 16))))


if __name__ == "__main__":
    main()
