import importlib.util
spec = importlib.util.spec_from_file_location("m", "/tmp/mt/muts3b.py"); m = importlib.util.module_from_spec(spec); spec.loader.exec_module(m)
M = {x[0]: x for x in m.MUTANTS}
_, f, o, n, _ = M["FC4"]
MUTANTS = [("FC4c", f, o, n, ["-k", "compare_table_is_the_records"]),
           ("FC4b", f, o, '    upper[-num_anchors_per_level[-1]:] = upper[-num_anchors_per_level[-1]:]\n', ["-k", "fcos"])]
