# variant: the backbone up to layer2 (stride 8, 128 channels), no layer3
import sys; sys.path.insert(0, __import__("os").path.join(__import__("os").path.dirname(__file__), "../.."))
import fast_rcnn as M
orig = M.make_backbone
def mb(cfg, load_backbone=True):
    body, c, fc = orig(cfg, load_backbone)
    return body[:3], 128, fc
M.make_backbone = mb
if __name__ == "__main__":
    M.main(sys.argv[1:])
