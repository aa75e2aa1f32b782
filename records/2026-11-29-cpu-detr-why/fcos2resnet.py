import sys, torch, torchvision
ck = torch.load(sys.argv[1], map_location='cpu', weights_only=True)
sd = ck['model']
body = {k[len('backbone.body.'):]: v for k, v in sd.items() if k.startswith('backbone.body.')}
ref = torchvision.models.resnet18().state_dict()
out = {k: body.get(k, ref[k]) for k in ref}
missing = [k for k in ref if k not in body]
print('from fcos:', sum(k in body for k in ref), 'kept from init:', missing[:6], len(missing))
torch.save(out, sys.argv[2])
