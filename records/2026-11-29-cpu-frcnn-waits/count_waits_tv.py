"""What makes a GPU wait in one step of a model file against torchvision's model (same converted weights, synthetic
images, CPU, torch.profiler): boolean selections (nonzero), .item() (_local_scalar_dense), NMS calls (each copies its
mask to the host), tensors made from Python numbers, and kernel-like operators (leaves of the profiler's tree, less
views and allocations). Train step = forward + backward; inference = eval forward.
    python records/2026-11-29-cpu-frcnn-waits/count_waits_tv.py faster_rcnn 128 16 [REPO]   # REPO: another checkout"""
import collections, importlib, os, sys
HERE = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # this checkout
ROOT = sys.argv[4] if len(sys.argv) > 4 else HERE
sys.path.insert(0, ROOT)
import torch, torchvision
import bench, data
torch.set_num_threads(2)
NOT_KERNELS = {"empty", "empty_strided", "as_strided", "view", "_reshape_alias", "resize_", "lift_fresh", "to",
               "detach", "alias", "t", "transpose", "expand", "unsqueeze", "select", "slice", "as_strided_",
               "_unsafe_view", "permute", "split", "unbind", "chunk", "reshape", "squeeze", "narrow", "empty_like",
               "detach_", "set_", "result_type", "_has_compatible_shallow_copy_type", "is_nonzero"}
name, S, B = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
module = importlib.import_module(name)
dataset = data.SyntheticShapes(B, S, seed=0)
images = [dataset[i][0] for i in range(B)]
targets = [{k: dataset[i][1][k] for k in ("boxes", "labels")} for i in range(B)]
fields = module.Config.__dataclass_fields__
sizes = dict(min_size=S, max_size=S) if "min_size" in fields else {}
tv = getattr(torchvision.models.detection, bench.MODELS[name])(weights=None, weights_backbone=None, num_classes=91,
                                                                **sizes)
plain_bn = dict(frozen_bn=False, bn_eps=1e-5) if "frozen_bn" in fields else {}
ours = module.DETECTOR(module.Config(**{**module.TORCHVISION_CONFIG, **plain_bn, "num_classes": 91, **sizes}))
ours.load_state_dict(module.convert_torchvision(tv.state_dict()))


def count(fn, model):
    fn(model)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn(model)
    memo = {}

    def kernel(e):  # an aten operator none of whose descendants is one
        if id(e) not in memo:
            op = e.name.startswith("aten::") and e.name[6:] not in NOT_KERNELS
            memo[id(e)] = op and not any([kernel(c) for c in e.cpu_children])
        return memo[id(e)]
    names = collections.Counter(e.name[6:] for e in prof.events() if kernel(e))
    nms = sum(e.name == "torchvision::nms" for e in prof.events())
    made = sum(e.name == "aten::lift_fresh" for e in prof.events())
    return names["nonzero"], names["_local_scalar_dense"], nms, made, sum(names.values())


def train(model):
    model.train()
    sum(model(images, targets).values()).backward()


def infer(model):
    model.eval()
    with torch.no_grad():
        model(images)


print(f"{name} ({ROOT}), {S} px, batch {B}; torch {torch.__version__}, torchvision {torchvision.__version__}")
print(f"{'':24} {'selections':>10} {'.item()':>8} {'NMS':>5} {'tensors from numbers':>21} {'kernel-like ops':>16}")
for label, fn in (("train step", train), ("inference", infer)):
    for who, model in ((f"{name}.py", ours), ("torchvision", tv)):
        print(f"{label + ', ' + who:24} " + " ".join(f"{n:>{w}}" for n, w in zip(count(fn, model), (10, 8, 5, 21, 16))))
