"""python run.py MUTANTS.py [IDS...]: each bug (id, files or "T" for all eight model files, old, new, pytest args) put
into a git copy of the repository (MUTATION_COPY) with this repository's test_models.py, the tests run, a line per bug
appended to MUTATION_LOG; the copy is reset before and after each."""
import json, os, re, runpy, shutil, subprocess, sys, time, pathlib

HERE = pathlib.Path(__file__).resolve().parent
COPY = pathlib.Path(os.environ.get("MUTATION_COPY", "/tmp/mut"))
LOG = os.environ.get("MUTATION_LOG", "results.jsonl")
TEMPLATE_FILES = ["faster_rcnn.py", "retinanet.py", "fcos.py", "ssd.py", "yolo.py", "detr.py", "rcnn.py", "fast_rcnn.py"]
DATA_TESTS = (HERE / "cd_k.txt").read_text().strip()  # pass1.py's "@CD": the data and evaluation tests


def run(mid, files, old, new, args):
    subprocess.run(["git", "-C", str(COPY), "checkout", "--", "."], check=True)
    shutil.copy(HERE.parent.parent / "test_models.py", COPY / "test_models.py")
    files = TEMPLATE_FILES if files == "T" else files
    for f in files:
        text = (COPY / f).read_text()
        assert text.count(old) == 1, (f, text.count(old), old)
        (COPY / f).write_text(text.replace(old, new))
    args = [a.replace("@CD", DATA_TESTS) for a in args]
    start = time.time()
    r = subprocess.run(["timeout", "1500", sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", "-rf",
                        "test_models.py", *args], cwd=COPY, capture_output=True, text=True)
    fails = re.findall(r"^FAILED (\S+)", r.stdout, re.M)
    tail = r.stdout.strip().splitlines()[-1] if r.stdout.strip() else r.stderr[-300:]
    record = dict(id=mid, files=files if isinstance(files, str) else ",".join(files), old=old, new=new,
                  args=args if len(" ".join(args)) < 300 else ["<long -k>"], rc=r.returncode, caught=r.returncode != 0,
                  fails=fails, tail=tail, secs=round(time.time() - start))
    with open(LOG, "a") as f:
        f.write(json.dumps(record) + "\n")
    subprocess.run(["git", "-C", str(COPY), "checkout", "--", "."], check=True)
    print(mid, "CAUGHT" if record["caught"] else "SURVIVED", fails[:2], tail, record["secs"], flush=True)


if __name__ == "__main__":
    for m in runpy.run_path(sys.argv[1])["MUTANTS"]:
        if not sys.argv[2:] or m[0] in sys.argv[2:]:
            run(*m)
