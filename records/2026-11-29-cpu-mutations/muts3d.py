import importlib.util
M = {}
for f in ("muts3.py", "muts3b.py", "muts3c.py"):
    spec = importlib.util.spec_from_file_location("m", "/tmp/mt/" + f); m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)
    M.update({x[0]: x for x in m.MUTANTS})
H = ["-k", "help_shows and retinanet"]
MUTANTS = []
for mid in ["D22", "D17", "T11", "T23", "T19", "T22", "T30", "T32", "D13", "D18", "RN2", "RN3", "RN4", "FC2", "FC4", "FC5", "D36", "C14", "C15"]:
    _, f, o, n, _ = M[mid]; MUTANTS.append((mid + "h", f, o, n, H if mid not in ("FC2","FC4","FC5") else ["-k", "help_shows and fcos"]))
for mid in ["RN3", "SSD8", "RN2", "RN4", "D17", "D22"]:
    _, f, o, n, _ = M[mid]; MUTANTS.append((mid + "c", f, o, n, ["-k", "compare_table_is_the_records"]))
for mid in ["SSD5", "SSD8"]:
    _, f, o, n, _ = M[mid]; MUTANTS.append((mid + "s", f, o, n, ["-k", "ssd_backbone_weights_and_frozen"]))
for mid in ["YO5", "YO6", "T23"]:
    _, f, o, n, _ = M[mid]; MUTANTS.append((mid + "y", f, o, n, ["-k", "yolo_v7_state_dict_as_weights"]))
