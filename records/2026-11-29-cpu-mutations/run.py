import os, json, subprocess, sys, re, pathlib, time
M = pathlib.Path(os.environ.get("MUTATION_COPY", "/tmp/mut"))  # a copy of the repository (git), reset per mutant
TEMPLATE_FILES = ["faster_rcnn.py","retinanet.py","fcos.py","ssd.py","yolo.py","detr.py","rcnn.py","fast_rcnn.py"]
CD = open(os.path.join(os.path.dirname(os.path.abspath(__file__)), "cd_k.txt")).read().strip()  # the data tests
def apply(files, old, new):
    for f in files:
        p = M / f
        s = p.read_text()
        n = s.count(old)
        assert n == 1, (f, n, old)
        p.write_text(s.replace(old, new))
def run(mid, files, old, new, args, log=os.environ.get("MUTATION_LOG", "/tmp/mt/results2.jsonl")):
    subprocess.run(["git", "-C", str(M), "checkout", "--", "."], check=True)
    import shutil; shutil.copy(os.path.join(os.path.dirname(os.path.abspath(__file__)), "..", "..", "test_models.py"), M / "test_models.py")
    if files == "T": files = TEMPLATE_FILES
    apply(files, old, new)
    args = [a.replace("@CD", CD) for a in args]
    t = time.time()
    r = subprocess.run(["timeout", "1500", sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "-rf",
                        "test_models.py", *args], cwd=M, capture_output=True, text=True)
    fails = re.findall(r"^FAILED (\S+)", r.stdout, re.M)
    tail = r.stdout.strip().splitlines()[-1] if r.stdout.strip() else r.stderr[-300:]
    rec = dict(id=mid, files=files if isinstance(files, str) else ",".join(files), old=old, new=new, args=args if len(" ".join(args))<300 else ["<long -k>"],
               rc=r.returncode, caught=r.returncode != 0, fails=fails, tail=tail, secs=round(time.time()-t))
    with open(log, "a") as f: f.write(json.dumps(rec) + "\n")
    subprocess.run(["git", "-C", str(M), "checkout", "--", "."], check=True)
    print(mid, "CAUGHT" if rec["caught"] else "SURVIVED", fails[:2], tail, rec["secs"], flush=True)
    return rec
if __name__ == "__main__":
    import importlib.util
    spec = importlib.util.spec_from_file_location("muts", sys.argv[1]); mod = importlib.util.module_from_spec(spec); spec.loader.exec_module(mod)
    only = sys.argv[2:] 
    for m in mod.MUTANTS:
        if only and m[0] not in only: continue
        run(*m)
