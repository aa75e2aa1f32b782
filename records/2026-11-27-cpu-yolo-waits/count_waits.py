"""Count what makes a GPU wait in one YOLO training step (forward + loss + backward) and one inference at batch 16:
boolean selections (nonzero), .item() and tensors made from Python numbers, for yolo.py and v7.0, on the CPU with
torch.profiler; also the operators that would launch a kernel (leaves of the profiler's tree, less views and
allocations; on a CPU Python scalars also count as copies, so this overstates both alike).
    python records/2026-11-27-cpu-yolo-waits/count_waits.py /tmp/yolov5     # a v7.0 work tree"""
import collections, contextlib, importlib.util, io, os, sys
ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)
import torch
import data, yolo
torch.set_num_threads(1)
spec = importlib.util.spec_from_file_location("mr", os.path.join(ROOT, "assets/yolov5_v7/make_reference.py"))
ref = importlib.util.module_from_spec(spec); spec.loader.exec_module(ref)
yv5 = ref.load_yolov5(sys.argv[1])
size, nc, B = 320, 80, 16
samples = [data.SyntheticShapes(B, size, seed=0)[i] for i in range(B)]
images = torch.stack([image for image, _ in samples])
targets = [{"boxes": t["boxes"], "labels": t["labels"]} for _, t in samples]
with contextlib.redirect_stdout(io.StringIO()):
    v5 = ref.make_model(yv5, nc, 0.33, 0.25, images[:8].mul(255).round().to(torch.uint8), 0.0)
compute_loss, labels = yv5.ComputeLoss(v5), ref.yolo_labels(targets, size)
ours = yolo.YOLO(yolo.Config(num_classes=nc + 1, backbone="yolov5n", image_size=size, letterbox_pad=0.0))
ours.load_state_dict(yolo.convert_yolov5(v5.state_dict()))


def train(model):
    model.train()
    loss = sum(ours(list(images), targets).values()) if model is ours else compute_loss(v5(images), labels)[0]
    loss.backward()


def infer(model):
    model.eval()
    with torch.no_grad():
        if model is ours:
            ours(list(images))
        else:
            for d in yv5.non_max_suppression(v5(images)[0], 0.001, 0.6, multi_label=True, max_det=300):
                yv5.scale_boxes((size, size), d[:, :4], (size, size))


NOT_KERNELS = {"empty", "empty_strided", "as_strided", "view", "_reshape_alias", "resize_", "lift_fresh", "to",
               "detach", "alias", "t", "transpose", "expand", "unsqueeze", "select", "slice", "as_strided_",
               "_unsafe_view", "permute", "split", "unbind", "chunk", "reshape", "squeeze", "narrow", "empty_like",
               "detach_", "set_", "result_type", "_has_compatible_shallow_copy_type", "is_nonzero"}


def count(fn, model):
    fn(model)
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as prof:
        fn(model)
    memo = {}

    def kernel(e):  # an aten operator none of whose descendants is one
        if id(e) not in memo:
            op = e.name.startswith("aten::") and e.name[6:] not in NOT_KERNELS
            below = [kernel(c) for c in e.cpu_children]
            memo[id(e)] = op and not any(below)
        return memo[id(e)]
    names = collections.Counter(e.name[6:] for e in prof.events() if kernel(e))
    made = sum(e.name == "aten::lift_fresh" for e in prof.events())
    return names["nonzero"], names["_local_scalar_dense"], made, sum(names.values())


print(f"yolov5n, {size} px, batch {B}, K = {nc}; torch {torch.__version__}")
print(f"{'':22} {'selections':>10} {'.item()':>8} {'tensors from numbers':>21} {'kernel-like ops':>16}")
for label, fn in (("train step", train), ("inference", infer)):
    for who, model in (("yolo.py", ours), ("v7.0", v5)):
        print(f"{label + ', ' + who:22} " + " ".join(f"{n:>{w}}" for n, w in zip(count(fn, model), (10, 8, 21, 16))))
